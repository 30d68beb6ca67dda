//! Configuration: a TOML file (optional), command-line overrides, and the built-in default.
//!
//! Loading is all-or-nothing: unknown keys, bad durations, empty or unmatchable rules, and a file
//! anyone but root could have written are refused with one message naming the key and the
//! problem. Nothing starts half-configured.
use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::probes::DEFAULT_RING_BYTES;

/// The built-in default, also shipped as an example file (`deploy/reaper.toml`). The one place
/// every global default is written: a file that leaves a key out gets the value here
/// ([`File::or_builtin`]); only `ring_bytes` comes from the probes' `DEFAULT_RING_BYTES`.
pub const DEFAULT_TOML: &str = r#"
# What reaper does with the processes its rules match.
mode = "enforce"                 # or "dry-run": decide, log and count, signal nothing
idle_timeout = "15m"             # no socket bytes and low CPU for this long = idle
cpu_threshold_percent = 2.0      # "low CPU": below this share of one core
orphan_grace = "60s"             # a target whose parent died is reaped after this
eof_grace = "2s"                 # after the clean end (input closed, or SIGINT): SIGTERM after this
grace = "5s"                     # SIGTERM, then SIGKILL after this
max_kills_per_minute = 10        # processes signalled (targets + descendants): a wrong rule cannot wipe a host
metrics_addr = "127.0.0.1:9847"
leftover_grace = "30s"           # a target's descendants still alive this long after it are leftovers
runaway_cpu_percent = 50.0       # an agent CLI that lost its terminal and burns this much CPU…
runaway_for = "2m"               # …for this long is a runaway
memory_pressure = true           # reap idle targets and leftovers at once when memory is short
memory_pressure_file = "/proc/pressure/memory"  # or a cgroup v2 memory.pressure
memory_pressure_some_avg10 = 20.0                # short when PSI `some avg10` is at least this…
memory_available_percent = 10.0                  # …or MemAvailable is below this share of MemTotal
memory_pressure_min_idle = "60s" # under pressure, a target quiet this long counts as idle
reconcile_interval = "60s"       # compare the tree with /proc this often
activity_source = "auto"         # socket tracepoints (6.3+), else /proc/PID/io; or "socket", "proc-io"
io_bytes_per_second = 256        # with proc-io: read+write bytes per second that count as activity

# The CLI child an Agent SDK daemon spawns per query (streaming JSON on its stdio, no terminal).
[[rule]]
name = "claude-sdk"
comm = ["claude", "claude.exe"]
argv_any = ["--input-format=stream-json", "--output-format=stream-json"]
require_no_tty = true
# How to end it first: "close-input" shuts its stdin down when that is a socket (as the SDK's
# close() does; the CLI exits 0 and the daemon's loop ends cleanly), else sends SIGINT (the CLI's
# own clean exit); "interrupt" always sends SIGINT; "none" starts with SIGTERM.
clean_end = "close-input"
leftovers = "connected"          # or "all" (also detached ones), or "none"
"#;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is a directory, not a file")]
    IsDirectory { path: PathBuf },
    #[error(
        "config {path} is not a regular file (a FIFO, device or socket could block or never end)"
    )]
    NotAFile { path: PathBuf },
    #[error("config {path} is {size} bytes; refusing anything over 1 MiB")]
    TooLarge { path: PathBuf, size: u64 },
    #[error(
        "config {path} is writable by someone other than root (owner uid {uid}, mode {mode:o}): \
         chown root and chmod go-w it"
    )]
    Insecure { path: PathBuf, uid: u32, mode: u32 },
    #[error(
        "config {path} is in {dir}, which someone other than root can write or chmod (owner uid \
         {uid}, mode {mode:o}): they could replace the file; chown root and chmod go-w {dir}, or \
         move the file"
    )]
    InsecureDirectory {
        path: PathBuf,
        dir: PathBuf,
        uid: u32,
        mode: u32,
    },
    #[error("config {path}: too many levels of symbolic links (a loop?)")]
    Symlink { path: PathBuf },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}: `{key}`: {problem}")]
    Invalid {
        path: String,
        key: String,
        problem: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Enforce,
    DryRun,
}

/// Where per-target activity comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivitySource {
    /// Socket tracepoints where the kernel has them (6.3+), else `/proc/PID/io`.
    Auto,
    /// `sock:sock_send_length` / `sock:sock_recv_length`, counted in the kernel for targets.
    Socket,
    /// Bytes read and written (`/proc/PID/io` rchar + wchar), sampled for targets only.
    ProcIo,
}

/// How a rule's targets are ended first, before SIGTERM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CleanEnd {
    /// Shut the target's stdin down when it is a stream socket (the CLI reads EOF and exits 0,
    /// as after the SDK's `close()`); SIGINT when it is not (a pipe) or cannot be reached.
    #[default]
    CloseInput,
    /// SIGINT, which the CLI treats as a request to end.
    Interrupt,
    /// No clean end: SIGTERM first.
    None,
}

impl CleanEnd {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::CloseInput => "close-input",
            Self::Interrupt => "interrupt",
            Self::None => "none",
        }
    }
}

/// Which of a session's leftovers a rule's targets may have reaped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Leftovers {
    /// Those whose stdin or stdout is a pipe or socket (stdio MCP servers, also behind a
    /// wrapper that exited): they were connected to the agent.
    #[default]
    Connected,
    /// Also those that detached on purpose (a session of their own, stdin `/dev/null`).
    All,
    /// None: leftovers are only reported.
    None,
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    mode: Option<Mode>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    cpu_threshold_percent: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    orphan_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    eof_grace: Option<Duration>,
    max_kills_per_minute: Option<u32>,
    metrics_addr: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde")]
    reconcile_interval: Option<Duration>,
    ring_bytes: Option<u32>,
    activity_source: Option<ActivitySource>,
    /// Bytes per second of read/write that count as activity with `activity_source = "proc-io"`.
    /// Measured with the test double: ≈ 16 B/s idle (eventfd writes), ≈ 880 B/s chatting.
    io_bytes_per_second: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    leftover_grace: Option<Duration>,
    runaway_cpu_percent: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    runaway_for: Option<Duration>,
    memory_pressure: Option<bool>,
    memory_pressure_file: Option<PathBuf>,
    memory_pressure_some_avg10: Option<f64>,
    memory_available_percent: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    memory_pressure_min_idle: Option<Duration>,
    #[serde(default, rename = "rule")]
    rules: Option<Vec<RuleFile>>,
}

impl File {
    /// The built-in default's global keys ([`DEFAULT_TOML`]; its rules are not used here).
    fn builtin() -> &'static File {
        static BUILTIN: std::sync::LazyLock<File> = std::sync::LazyLock::new(|| {
            toml::from_str(DEFAULT_TOML).expect("the built-in default config is valid TOML")
        });
        &BUILTIN
    }

    /// Every global key this file leaves out, from the built-in default. Destructured in full,
    /// so a new key cannot be forgotten here.
    fn or_builtin(self) -> File {
        let File {
            mode,
            idle_timeout,
            cpu_threshold_percent,
            orphan_grace,
            grace,
            eof_grace,
            max_kills_per_minute,
            metrics_addr,
            reconcile_interval,
            ring_bytes,
            activity_source,
            io_bytes_per_second,
            leftover_grace,
            runaway_cpu_percent,
            runaway_for,
            memory_pressure,
            memory_pressure_file,
            memory_pressure_some_avg10,
            memory_available_percent,
            memory_pressure_min_idle,
            rules: _,
        } = File::builtin().clone();
        File {
            mode: self.mode.or(mode),
            idle_timeout: self.idle_timeout.or(idle_timeout),
            cpu_threshold_percent: self.cpu_threshold_percent.or(cpu_threshold_percent),
            orphan_grace: self.orphan_grace.or(orphan_grace),
            grace: self.grace.or(grace),
            eof_grace: self.eof_grace.or(eof_grace),
            max_kills_per_minute: self.max_kills_per_minute.or(max_kills_per_minute),
            metrics_addr: self.metrics_addr.or(metrics_addr),
            reconcile_interval: self.reconcile_interval.or(reconcile_interval),
            ring_bytes: self.ring_bytes.or(ring_bytes),
            activity_source: self.activity_source.or(activity_source),
            io_bytes_per_second: self.io_bytes_per_second.or(io_bytes_per_second),
            leftover_grace: self.leftover_grace.or(leftover_grace),
            runaway_cpu_percent: self.runaway_cpu_percent.or(runaway_cpu_percent),
            runaway_for: self.runaway_for.or(runaway_for),
            memory_pressure: self.memory_pressure.or(memory_pressure),
            memory_pressure_file: self.memory_pressure_file.or(memory_pressure_file),
            memory_pressure_some_avg10: self
                .memory_pressure_some_avg10
                .or(memory_pressure_some_avg10),
            memory_available_percent: self.memory_available_percent.or(memory_available_percent),
            memory_pressure_min_idle: self.memory_pressure_min_idle.or(memory_pressure_min_idle),
            rules: self.rules,
        }
    }
}

/// A global key [`DEFAULT_TOML`] sets (a unit test checks that it sets them all).
fn builtin<T>(value: Option<T>) -> T {
    value.expect("DEFAULT_TOML sets every global key but ring_bytes")
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    /// `comm` or executable basename, exactly.
    comm: Vec<String>,
    /// At least one of these flags must be in argv; `--flag=value` also matches `--flag value`.
    #[serde(default)]
    argv_any: Vec<String>,
    #[serde(default = "yes")]
    require_no_tty: bool,
    /// If set, the parent's comm must be one of these.
    #[serde(default)]
    parent_comm: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    orphan_grace: Option<Duration>,
    cpu_threshold_percent: Option<f64>,
    #[serde(default)]
    clean_end: CleanEnd,
    #[serde(default)]
    leftovers: Leftovers,
}

fn yes() -> bool {
    true
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rule {
    pub name: String,
    pub comm: Vec<String>,
    pub argv_any: Vec<String>,
    pub require_no_tty: bool,
    pub parent_comm: Vec<String>,
    pub idle_timeout: Duration,
    pub orphan_grace: Duration,
    /// Fraction of one core (0.02 = 2 %).
    pub cpu_threshold: f64,
    /// The first step of the kill ladder.
    pub clean_end: CleanEnd,
    /// Which leftovers of its sessions are reaped.
    pub(crate) leftovers: Leftovers,
}

/// When memory is short enough to reap idle targets and leftovers without waiting.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryPressure {
    pub enabled: bool,
    /// A PSI file: `/proc/pressure/memory`, or a cgroup v2 `memory.pressure`.
    pub file: PathBuf,
    /// Short when `some avg10` is at least this (percent).
    pub some_avg10: f64,
    /// …or when MemAvailable is below this share of MemTotal (percent).
    pub available_percent: f64,
    /// A target quiet for this long counts as idle under pressure.
    pub min_idle: Duration,
}

/// The validated configuration the daemon runs with.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    pub mode: Mode,
    /// From the clean end (input closed, SIGINT) to SIGTERM.
    pub eof_grace: Duration,
    /// From SIGTERM to SIGKILL.
    pub grace: Duration,
    pub max_kills_per_minute: u32,
    pub metrics_addr: SocketAddr,
    pub reconcile_interval: Duration,
    pub ring_bytes: u32,
    pub activity_source: ActivitySource,
    pub io_bytes_per_second: u64,
    /// A target's descendants still alive this long after it exited are leftovers.
    pub leftover_grace: Duration,
    /// An agent CLI that lost its terminal and burns more than this fraction of a core…
    pub runaway_cpu: f64,
    /// …for this long is reaped.
    pub runaway_for: Duration,
    pub memory_pressure: MemoryPressure,
    pub rules: Vec<Rule>,
    /// Where it came from ("built-in default" or a path).
    pub origin: String,
}

/// Command-line flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub idle_timeout: Option<Duration>,
    pub grace: Option<Duration>,
    pub dry_run: bool,
    pub metrics_addr: Option<SocketAddr>,
}

impl Config {
    /// The built-in default.
    pub fn builtin() -> Self {
        parse(DEFAULT_TOML, "built-in default", &Overrides::default())
            .expect("the built-in default config is valid")
    }

    /// Loads `path` (checking who can write it), applying `overrides`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = read_secure(path)?;
        parse(&text, &path.display().to_string(), overrides)
    }

    /// The configuration for `reaper run`: the file if given, else the built-in default.
    pub fn resolve(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        match path {
            Some(path) => Self::load(path, overrides),
            None => parse(DEFAULT_TOML, "built-in default", overrides),
        }
    }
}

/// Reads a config file that only root (or the user running reaper) can have written or
/// replaced, checking the file it actually reads, not a path that may change meanwhile.
///
/// The directory part is resolved (symlinks followed) once, then walked from `/` one real
/// directory at a time, each opened relative to the one before with `O_NOFOLLOW` (a component
/// swapped for a symlink meanwhile fails the walk). Every directory must be owned by root (or
/// the user running reaper) and writable by no one else, except with the sticky bit set (as
/// `/tmp`): there only an entry's owner can rename or remove it, and the entries walked are
/// checked to be root's in turn. A directory owned by anyone else is refused even if not
/// writable now: its owner can chmod it. The file is then opened once, relative to the last
/// directory, with `O_NOFOLLOW` (a symlink is refused: name the file itself), `O_NONBLOCK`
/// (opening a FIFO must not wait for a writer) and `O_CLOEXEC`, and its type, size, owner and
/// mode are read with `fstat` on that open file.
fn read_secure(path: &Path) -> Result<String, ConfigError> {
    read_secure_at(path, path, 0)
}

/// Symbolic links followed at most (a ConfigMap volume uses two: the file, then `..data`).
const MAX_SYMLINKS: u32 = 8;

/// [`read_secure`] for `path`, reached from `asked` through `links` symbolic links.
fn read_secure_at(path: &Path, asked: &Path, links: u32) -> Result<String, ConfigError> {
    use rustix::fs::{Mode, OFlags};
    let read_err = |source: std::io::Error| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let me = rustix::process::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == me;
    let Some(name) = path.file_name() else {
        return Err(ConfigError::IsDirectory {
            path: path.to_owned(),
        });
    };
    let parent = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let real_parent = std::fs::canonicalize(parent).map_err(read_err)?;
    let walk = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = rustix::fs::open("/", walk, Mode::empty()).map_err(|e| read_err(e.into()))?;
    let mut walked = PathBuf::from("/");
    loop {
        let st = rustix::fs::fstat(&dir).map_err(|e| read_err(e.into()))?;
        let mode = st.st_mode & 0o7777;
        let open_to_others = mode & 0o022 != 0 && mode & 0o1000 == 0;
        if !trusted(st.st_uid) || open_to_others {
            return Err(ConfigError::InsecureDirectory {
                path: path.to_owned(),
                dir: walked,
                uid: st.st_uid,
                mode,
            });
        }
        let Some(next) = real_parent
            .strip_prefix(&walked)
            .ok()
            .and_then(|rest| rest.components().next())
        else {
            break;
        };
        walked.push(next);
        dir = rustix::fs::openat(&dir, next.as_os_str(), walk, Mode::empty()).map_err(|e| {
            ConfigError::Read {
                path: path.to_owned(),
                source: std::io::Error::other(format!(
                    "{} changed while its directories were checked: {e}",
                    walked.display()
                )),
            }
        })?;
    }
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let file = match rustix::fs::openat(&dir, name, flags, Mode::empty()) {
        Ok(fd) => std::fs::File::from(fd),
        // A symbolic link, in a directory only root (or reaper's user) can change, as a
        // Kubernetes ConfigMap volume makes them: its target is checked the same way, its
        // directories and the file itself.
        Err(rustix::io::Errno::LOOP) if links < MAX_SYMLINKS => {
            let target =
                rustix::fs::readlinkat(&dir, name, Vec::new()).map_err(|e| read_err(e.into()))?;
            let target = PathBuf::from(
                <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(
                    target.into_bytes(),
                ),
            );
            return read_secure_at(&real_parent.join(target), asked, links + 1);
        }
        Err(rustix::io::Errno::LOOP) => {
            return Err(ConfigError::Symlink {
                path: asked.to_owned(),
            });
        }
        Err(e) => return Err(read_err(e.into())),
    };
    let meta = file.metadata().map_err(read_err)?;
    if meta.is_dir() {
        return Err(ConfigError::IsDirectory {
            path: path.to_owned(),
        });
    }
    // A FIFO would block the read forever, a device like /dev/kmsg never end: regular files only.
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            path: path.to_owned(),
        });
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if !trusted(meta.uid()) || mode & 0o022 != 0 {
        return Err(ConfigError::Insecure {
            path: path.to_owned(),
            uid: meta.uid(),
            mode,
        });
    }
    // The file may have grown since: read one byte past the limit at most.
    use std::io::Read as _;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            size: text.len() as u64,
        });
    }
    Ok(text)
}

/// The largest configuration file read (1 MiB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Parses and validates TOML text.
pub fn parse(text: &str, origin: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    let file: File = toml::from_str(text).map_err(|err| ConfigError::Parse {
        path: origin.to_owned(),
        message: err.to_string().trim_end().replace('\n', " "),
    })?;
    let file = file.or_builtin();
    let invalid = |key: &str, problem: String| ConfigError::Invalid {
        path: origin.to_owned(),
        key: key.to_owned(),
        problem,
    };
    let positive = |key: &str, d: Duration| {
        if d.is_zero() {
            Err(invalid(key, "must be longer than 0s".into()))
        } else {
            Ok(d)
        }
    };
    let percent = |key: &str, p: f64| {
        if p.is_finite() && p > 0.0 && p <= 100.0 * 1024.0 {
            Ok(p / 100.0)
        } else {
            Err(invalid(
                key,
                format!("{p} is not a percentage of a core above 0"),
            ))
        }
    };

    let idle_timeout = positive(
        "idle_timeout",
        overrides.idle_timeout.unwrap_or(builtin(file.idle_timeout)),
    )?;
    let orphan_grace = builtin(file.orphan_grace);
    let cpu_threshold = percent("cpu_threshold_percent", builtin(file.cpu_threshold_percent))?;
    let grace = positive("grace", overrides.grace.unwrap_or(builtin(file.grace)))?;
    let eof_grace = positive("eof_grace", builtin(file.eof_grace))?;
    let max_kills_per_minute = builtin(file.max_kills_per_minute);
    if max_kills_per_minute == 0 {
        return Err(invalid(
            "max_kills_per_minute",
            "must be at least 1 (use mode = \"dry-run\" to kill nothing)".into(),
        ));
    }
    let ring_bytes = file.ring_bytes.unwrap_or(DEFAULT_RING_BYTES);
    if !ring_bytes.is_power_of_two() || ring_bytes < 4096 {
        return Err(invalid(
            "ring_bytes",
            format!("{ring_bytes} is not a power of two of at least 4096"),
        ));
    }
    let reconcile_interval = positive("reconcile_interval", builtin(file.reconcile_interval))?;

    let Some(rule_files) = file.rules else {
        return Err(invalid(
            "rule",
            "no [[rule]] given: reaper would have nothing to watch".into(),
        ));
    };
    if rule_files.is_empty() {
        return Err(invalid("rule", "the rule list is empty".into()));
    }
    let mut rules: Vec<Rule> = Vec::with_capacity(rule_files.len());
    for (i, r) in rule_files.into_iter().enumerate() {
        let key = |field: &str| format!("rule[{i}].{field}");
        if r.name.trim().is_empty() {
            return Err(invalid(&key("name"), "must not be empty".into()));
        }
        if rules.iter().any(|other| other.name == r.name) {
            return Err(invalid(&key("name"), format!("{:?} is used twice", r.name)));
        }
        if r.comm.is_empty() {
            return Err(invalid(
                &key("comm"),
                "is empty: the rule could never match".into(),
            ));
        }
        if let Some(bad) = r.comm.iter().find(|c| c.is_empty() || c.contains('/')) {
            return Err(invalid(
                &key("comm"),
                format!("{bad:?} can never be a process name or executable basename"),
            ));
        }
        if let Some(bad) = r.argv_any.iter().find(|a| a.trim().is_empty()) {
            return Err(invalid(
                &key("argv_any"),
                format!("{bad:?} matches nothing"),
            ));
        }
        if let Some(bad) = r.parent_comm.iter().find(|c| c.is_empty()) {
            return Err(invalid(
                &key("parent_comm"),
                format!("{bad:?} matches nothing"),
            ));
        }
        let rule_idle = match overrides.idle_timeout {
            Some(d) => d,
            None => r.idle_timeout.unwrap_or(idle_timeout),
        };
        rules.push(Rule {
            name: r.name,
            comm: r.comm,
            argv_any: r.argv_any,
            require_no_tty: r.require_no_tty,
            parent_comm: r.parent_comm,
            idle_timeout: positive(&key("idle_timeout"), rule_idle)?,
            orphan_grace: r.orphan_grace.unwrap_or(orphan_grace),
            cpu_threshold: match r.cpu_threshold_percent {
                Some(p) => percent(&key("cpu_threshold_percent"), p)?,
                None => cpu_threshold,
            },
            clean_end: r.clean_end,
            leftovers: r.leftovers,
        });
    }

    Ok(Config {
        mode: if overrides.dry_run {
            Mode::DryRun
        } else {
            builtin(file.mode)
        },
        eof_grace,
        grace,
        max_kills_per_minute,
        metrics_addr: overrides.metrics_addr.unwrap_or(builtin(file.metrics_addr)),
        reconcile_interval,
        ring_bytes,
        activity_source: builtin(file.activity_source),
        io_bytes_per_second: builtin(file.io_bytes_per_second),
        leftover_grace: positive("leftover_grace", builtin(file.leftover_grace))?,
        runaway_cpu: percent("runaway_cpu_percent", builtin(file.runaway_cpu_percent))?,
        runaway_for: positive("runaway_for", builtin(file.runaway_for))?,
        memory_pressure: MemoryPressure {
            enabled: builtin(file.memory_pressure),
            file: builtin(file.memory_pressure_file),
            some_avg10: match builtin(file.memory_pressure_some_avg10) {
                p if p.is_finite() && (0.0..=100.0).contains(&p) => p,
                p => {
                    return Err(invalid(
                        "memory_pressure_some_avg10",
                        format!("{p} is not a percentage"),
                    ));
                }
            },
            available_percent: match builtin(file.memory_available_percent) {
                p if p.is_finite() && (0.0..=100.0).contains(&p) => p,
                p => {
                    return Err(invalid(
                        "memory_available_percent",
                        format!("{p} is not a percentage"),
                    ));
                }
            },
            min_idle: positive(
                "memory_pressure_min_idle",
                builtin(file.memory_pressure_min_idle),
            )?,
        },
        rules,
        origin: origin.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, "test.toml", &Overrides::default())
            .unwrap_err()
            .to_string()
    }

    const RULE: &str = "[[rule]]\nname = \"r\"\ncomm = [\"claude\"]\n";

    #[test]
    fn the_builtin_default_describes_the_sdk_cli() {
        let c = Config::builtin();
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.rules.len(), 1);
        let r = &c.rules[0];
        assert_eq!(r.comm, ["claude", "claude.exe"]);
        assert!(r.require_no_tty);
        assert_eq!(r.idle_timeout, Duration::from_secs(900));
        assert_eq!(r.orphan_grace, Duration::from_secs(60));
        assert!((r.cpu_threshold - 0.02).abs() < 1e-9);
        assert_eq!(c.grace, Duration::from_secs(5));
        assert_eq!(c.eof_grace, Duration::from_secs(2));
        assert_eq!(r.clean_end, CleanEnd::CloseInput);
        assert_eq!(c.max_kills_per_minute, 10);
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9847");
    }

    #[test]
    fn a_file_that_sets_nothing_gets_exactly_the_builtin_defaults() {
        // Every global default is written once, in DEFAULT_TOML: a file with a rule and no
        // other key gets each of them (parse would panic on one it lacks), and nothing else.
        let mut bare = parse(RULE, "t", &Overrides::default()).unwrap();
        let builtin = Config::builtin();
        bare.rules = builtin.rules.clone();
        bare.origin = builtin.origin.clone();
        assert_eq!(bare, builtin);
        assert_eq!(
            builtin.ring_bytes, DEFAULT_RING_BYTES,
            "the probes' constant is the one default for it"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let o = Overrides {
            idle_timeout: Some(Duration::from_secs(90)),
            grace: Some(Duration::from_secs(1)),
            dry_run: true,
            metrics_addr: Some("127.0.0.1:1".parse().unwrap()),
        };
        let c = parse(
            &format!("idle_timeout = \"1h\"\n{RULE}idle_timeout = \"2h\"\n"),
            "t",
            &o,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::DryRun);
        assert_eq!(c.rules[0].idle_timeout, Duration::from_secs(90));
        assert_eq!(c.grace, Duration::from_secs(1));
        assert_eq!(c.metrics_addr.port(), 1);
    }

    #[test]
    fn human_durations_and_rule_level_settings() {
        let c = parse(
            &format!(
                "idle_timeout = \"90s\"\norphan_grace = \"2m\"\n{RULE}cpu_threshold_percent = 5\n"
            ),
            "t",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.rules[0].idle_timeout, Duration::from_secs(90));
        assert_eq!(c.rules[0].orphan_grace, Duration::from_secs(120));
        assert!((c.rules[0].cpu_threshold - 0.05).abs() < 1e-9);
    }

    #[test]
    fn bad_input_is_refused_naming_the_key() {
        assert!(
            err(&format!("idle_timout = \"5m\"\n{RULE}")).contains("idle_timout"),
            "unknown key"
        );
        assert!(err(&format!("idle_timeout = \"5 parsecs\"\n{RULE}")).contains("idle_timeout"));
        assert!(err(&format!("idle_timeout = \"0s\"\n{RULE}")).contains("`idle_timeout`"));
        assert!(err("mode = \"enforce\"\n").contains("`rule`"), "no rules");
        assert!(err("rule = []\n").contains("`rule`"));
        assert!(err("[[rule]]\nname = \"r\"\ncomm = []\n").contains("`rule[0].comm`"));
        assert!(err("[[rule]]\nname = \"r\"\ncomm = [\"/bin/claude\"]\n").contains("rule[0].comm"));
        assert!(
            err(&format!("{RULE}{RULE}")).contains("`rule[1].name`"),
            "duplicate name"
        );
        assert!(err(&format!("{RULE}bogus = 1\n")).contains("bogus"));
        assert!(err(&format!("mode = \"kill-all\"\n{RULE}")).contains("mode"));
        assert!(
            err(&format!("cpu_threshold_percent = -1\n{RULE}")).contains("cpu_threshold_percent")
        );
        assert!(err(&format!("max_kills_per_minute = 0\n{RULE}")).contains("max_kills_per_minute"));
        assert!(err(&format!("ring_bytes = 1000\n{RULE}")).contains("ring_bytes"));
        assert!(err("").contains("`rule`"), "empty file");
    }

    /// A fresh directory under the temp dir (root's 0755), removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("reaper-config-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            Self(dir)
        }

        /// A valid config file `name` of mode 0644 in `dir`.
        fn file(dir: &Path, name: &str) -> PathBuf {
            let path = dir.join(name);
            std::fs::write(&path, RULE).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load(path, &Overrides::default())
    }

    /// A uid that is neither root nor this process's.
    const OTHER_UID: u32 = 54_321;

    fn chown(path: &Path, uid: u32) -> bool {
        match std::os::unix::fs::lchown(path, Some(uid), None) {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "skipped: cannot chown {} ({e}); run as root (cargo xtask test)",
                    path.display()
                );
                false
            }
        }
    }

    #[test]
    fn files_anyone_could_write_are_refused() {
        let dir = Scratch::new("file");
        let path = Scratch::file(&dir.0, "reaper.toml");
        assert!(load(&path).is_ok());
        for mode in [0o666, 0o664, 0o646] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load(&path).unwrap_err();
            assert!(matches!(e, ConfigError::Insecure { .. }), "{mode:o}: {e}");
            assert!(e.to_string().contains("chmod go-w"), "{e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        if chown(&path, OTHER_UID) {
            let e = load(&path).unwrap_err();
            assert!(
                matches!(e, ConfigError::Insecure { uid: OTHER_UID, .. }),
                "{e}"
            );
            assert!(
                e.to_string().contains(&format!("owner uid {OTHER_UID}")),
                "{e}"
            );
        }
        let e = load(&dir.0).unwrap_err();
        assert!(matches!(e, ConfigError::IsDirectory { .. }), "{e}");
        let e = load(&dir.0.join("missing.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        let big = dir.0.join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let e = load(&big).unwrap_err();
        assert!(matches!(e, ConfigError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn a_symlink_is_followed_only_where_nobody_else_can_switch_it() {
        // A Kubernetes ConfigMap volume: reaper.toml -> ..data/reaper.toml, ..data -> ..2026_x.
        let dir = Scratch::new("symlink");
        let version = dir.0.join("..2026_11_28");
        std::fs::create_dir(&version).unwrap();
        std::fs::set_permissions(&version, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch::file(&version, "reaper.toml");
        std::os::unix::fs::symlink("..2026_11_28", dir.0.join("..data")).unwrap();
        let link = dir.0.join("reaper.toml");
        std::os::unix::fs::symlink("..data/reaper.toml", &link).unwrap();
        assert!(load(&link).is_ok(), "{:?}", load(&link).err());
        // Its target in a directory others can write: they could switch the file.
        std::fs::set_permissions(&version, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = load(&link).unwrap_err();
        assert!(
            matches!(&e, ConfigError::InsecureDirectory { dir, .. } if *dir == version),
            "{e}"
        );
        // A loop ends with one clear error.
        let a = dir.0.join("a.toml");
        let b = dir.0.join("b.toml");
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let e = load(&a).unwrap_err();
        assert!(matches!(e, ConfigError::Symlink { .. }), "{e}");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = Scratch::new("dir");
        let sub = dir.0.join("etc");
        std::fs::create_dir(&sub).unwrap();
        let path = Scratch::file(&sub, "reaper.toml");
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            load(&path).is_ok(),
            "root's 0755 directories, under the sticky temp dir"
        );
        for mode in [0o777, 0o775, 0o757] {
            std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load(&path).unwrap_err();
            assert!(
                matches!(&e, ConfigError::InsecureDirectory { dir, .. } if *dir == sub),
                "{mode:o}: {e}"
            );
            assert!(
                e.to_string().contains(&sub.display().to_string()),
                "names the directory: {e}"
            );
        }
        // Sticky (as /tmp): others may add entries but not replace root's.
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(load(&path).is_ok(), "a sticky directory of root's");
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Owned by someone else: refused even while not writable (they can chmod it).
        if chown(&sub, OTHER_UID) {
            let e = load(&path).unwrap_err();
            assert!(
                matches!(e, ConfigError::InsecureDirectory { uid: OTHER_UID, .. }),
                "{e}"
            );
            // Also when reached through a symlink: the real directory is what is checked.
            let link = dir.0.join("link");
            std::os::unix::fs::symlink(&sub, &link).unwrap();
            let e = load(&link.join("reaper.toml")).unwrap_err();
            assert!(
                matches!(&e, ConfigError::InsecureDirectory { dir, .. } if *dir == sub),
                "{e}"
            );
            assert!(chown(&sub, 0));
            assert!(
                load(&link.join("reaper.toml")).is_ok(),
                "a symlinked directory chain of root's"
            );
        }
    }

    #[test]
    fn fifos_and_devices_are_refused_without_being_read() {
        // Reading a FIFO blocks until a writer comes (forever); /dev/kmsg and the like never
        // end. Opening is non-blocking, so not even the open waits for a writer.
        let dir = Scratch::new("fifo");
        let fifo = dir.0.join("reaper.toml");
        use rustix::fs::{CWD, FileType, Mode};
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        for path in [fifo.as_path(), Path::new("/dev/null")] {
            let e = load(path).unwrap_err();
            assert!(
                matches!(e, ConfigError::NotAFile { .. }),
                "{}: {e}",
                path.display()
            );
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
    }
}
