//! `reaper check`: can reaper run on this host, as this user? And if not, what to change.
//!
//! [`inspect`] gathers the facts (privileges, kernel BTF and the layout and tracepoints reaper
//! reads from it, kernel version, pidfd support, limits) and [`assess`] turns them into a
//! [`CheckReport`]: one row per item, `ok`, `missing` (reaper cannot run), `warn` (it runs,
//! degraded) or `info`, each problem with a one-line fix. Gathering never panics; whatever
//! cannot be read becomes a row saying so.
use std::fmt;

use crate::probes::{DEFAULT_RING_BYTES, LIFECYCLE_TRACEPOINTS, SOCKET_TRACEPOINTS, layout};

/// Capability numbers (`include/uapi/linux/capability.h`).
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_KILL: u32 = 5;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYS_RESOURCE: u32 = 24;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The capabilities to grant a non-root reaper (or to keep in a service's bounding set).
pub const CAPABILITY_FIX: &str =
    "run as root or grant CAP_BPF,CAP_PERFMON,CAP_KILL,CAP_SYS_PTRACE,CAP_DAC_READ_SEARCH";

/// How an item stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Present and usable.
    Ok,
    /// Required and absent: reaper cannot run.
    Missing,
    /// Absent or doubtful, but reaper runs (degraded, or with a caveat).
    Warn,
    /// Informational only.
    Info,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::Warn => "warn",
            Status::Info => "info",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One row of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckItem {
    pub item: String,
    pub status: Status,
    pub detail: String,
    /// What to do about it; empty when nothing needs doing.
    pub fix: String,
}

impl CheckItem {
    fn new(item: impl Into<String>, status: Status, detail: impl Into<String>) -> Self {
        Self {
            item: item.into(),
            status,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = fix.into();
        self
    }
}

/// Everything `reaper check` found. Displayed as a table and a closing verdict line (ending in
/// a newline, ready for `print!`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub items: Vec<CheckItem>,
}

impl CheckReport {
    /// Whether `reaper run` can work here: nothing required is missing.
    pub fn can_run(&self) -> bool {
        !self.items.iter().any(|i| i.status == Status::Missing)
    }

    /// The row named `item`.
    pub fn get(&self, item: &str) -> Option<&CheckItem> {
        self.items.iter().find(|i| i.item == item)
    }

    /// Rows with this status.
    pub fn with_status(&self, status: Status) -> impl Iterator<Item = &CheckItem> {
        self.items.iter().filter(move |i| i.status == status)
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render_table(&self.items))?;
        let missing = self.with_status(Status::Missing).count();
        let warnings = self.with_status(Status::Warn).count();
        let warned = match warnings {
            0 => String::new(),
            1 => " (1 warning)".to_owned(),
            n => format!(" ({n} warnings)"),
        };
        if missing == 0 {
            writeln!(f, "\nreaper can run here{warned}.")
        } else {
            writeln!(
                f,
                "\nreaper cannot run here: {missing} required item(s) missing{warned}; see FIX."
            )
        }
    }
}

/// The rows as an aligned table: ITEM, STATUS, DETAIL, FIX (the last column unpadded).
pub fn render_table(items: &[CheckItem]) -> String {
    const HEADER: [&str; 4] = ["ITEM", "STATUS", "DETAIL", "FIX"];
    let width = |col: usize, cell: fn(&CheckItem) -> &str| {
        items
            .iter()
            .map(|i| cell(i).chars().count())
            .chain([HEADER[col].len()])
            .max()
            .unwrap_or(0)
    };
    let (w_item, w_status, w_detail) = (
        width(0, |i| &i.item),
        width(1, |i| i.status.as_str()),
        width(2, |i| &i.detail),
    );
    let line = |item: &str, status: &str, detail: &str, fix: &str| {
        let row = format!("{item:<w_item$}  {status:<w_status$}  {detail:<w_detail$}  {fix}");
        row.trim_end().to_owned() + "\n"
    };
    let mut out = line(HEADER[0], HEADER[1], HEADER[2], HEADER[3]);
    for i in items {
        out.push_str(&line(&i.item, i.status.as_str(), &i.detail, &i.fix));
    }
    out
}

/// What the kernel's BTF told us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BtfFacts {
    /// `/sys/kernel/btf/vmlinux` does not exist.
    Absent,
    /// It exists but could not be read or parsed.
    Unreadable(String),
    Parsed {
        /// Every struct offset the eBPF programs need, or why not.
        offsets: Result<(), String>,
        /// Each tracepoint checked, with its argument count if BTF has its prototype.
        tracepoints: Vec<(String, Option<usize>)>,
    },
}

/// The raw facts [`assess`] judges. Gathered by [`Facts::gather`], or made up in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub euid: u32,
    /// Effective capability bits (`CapEff` of `/proc/self/status`), if readable.
    pub cap_eff: Option<u64>,
    /// `uname -r`, and `uname -m`.
    pub kernel_release: Option<String>,
    pub machine: Option<String>,
    pub btf: BtfFacts,
    /// `pidfd_open` on our own pid: `Ok`, or the error (`ENOSYS` before 5.3).
    pub pidfd: Result<(), PidfdError>,
    /// `RLIMIT_MEMLOCK` (soft, hard) in bytes; `u64::MAX` for unlimited.
    pub memlock: Option<(u64, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PidfdError {
    /// The kernel has no `pidfd_open` (before 5.3).
    NotSupported,
    Other(String),
}

impl Facts {
    /// Reads this process's privileges and the running kernel's features. Never panics.
    pub fn gather() -> Self {
        let uname = nix::sys::utsname::uname().ok();
        let text = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
        Self {
            euid: rustix::process::geteuid().as_raw(),
            cap_eff: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| parse_cap_eff(&s)),
            kernel_release: uname.as_ref().map(|u| text(u.release())),
            machine: uname.as_ref().map(|u| text(u.machine())),
            btf: gather_btf(),
            pidfd: match rustix::process::pidfd_open(
                rustix::process::getpid(),
                rustix::process::PidfdFlags::empty(),
            ) {
                Ok(fd) => {
                    drop(fd);
                    Ok(())
                }
                Err(rustix::io::Errno::NOSYS) => Err(PidfdError::NotSupported),
                Err(err) => Err(PidfdError::Other(err.to_string())),
            },
            memlock: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
                .ok()
                .map(|(soft, hard)| (rlim(soft), rlim(hard))),
        }
    }
}

fn rlim(value: libc::rlim_t) -> u64 {
    if value == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        value
    }
}

fn gather_btf() -> BtfFacts {
    if !std::path::Path::new(layout::VMLINUX_BTF).exists() {
        return BtfFacts::Absent;
    }
    let btf = match layout::vmlinux() {
        Ok(btf) => btf,
        Err(err) => return BtfFacts::Unreadable(error_chain(&err)),
    };
    let offsets = layout::kernel_offsets(&btf)
        .map(drop)
        .map_err(|err| error_chain(&err));
    let tracepoints = LIFECYCLE_TRACEPOINTS
        .iter()
        .chain(&SOCKET_TRACEPOINTS)
        .map(|&name| (name.to_owned(), layout::tracepoint_arity(&btf, name).ok()))
        .collect();
    BtfFacts::Parsed {
        offsets,
        tracepoints,
    }
}

/// An error and its sources, on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Inspects this host and this process: what `reaper check` prints.
pub fn inspect() -> CheckReport {
    assess(&Facts::gather())
}

/// The `CapEff:` bits of a `/proc/PID/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// `(major, minor, patch)` from a kernel release such as `6.18.44-fc-v657` or `5.15.0-91-generic`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32, u32)> {
    let mut parts = release.trim().splitn(3, '.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Bytes as a short human string (`16 MiB`, `unlimited`).
pub fn human_bytes(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "unlimited".to_owned();
    }
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024 && value.is_multiple_of(1024) && unit < UNITS.len() - 1 {
        value /= 1024;
        unit += 1;
    }
    format!("{value} {}", UNITS[unit])
}

/// Judges the facts: one row per item, in a fixed order.
pub fn assess(facts: &Facts) -> CheckReport {
    let mut items = Vec::new();
    let version = facts
        .kernel_release
        .as_deref()
        .and_then(parse_kernel_version);

    // Who we are.
    items.push(CheckItem::new(
        "running as",
        Status::Info,
        if facts.euid == 0 {
            "root (uid 0)".to_owned()
        } else {
            format!("uid {} (not root: capabilities decide)", facts.euid)
        },
    ));

    // Capabilities.
    match facts.cap_eff {
        None => items.push(
            CheckItem::new(
                "capabilities",
                Status::Warn,
                "cannot read CapEff from /proc/self/status",
            )
            .fix(CAPABILITY_FIX),
        ),
        Some(caps) => items.extend(capability_items(caps)),
    }

    // Kernel.
    let kernel_detail = match (&facts.kernel_release, &facts.machine) {
        (Some(release), Some(machine)) => format!("Linux {release} {machine}"),
        (Some(release), None) => format!("Linux {release}"),
        _ => "uname failed".to_owned(),
    };
    items.push(CheckItem::new("kernel", Status::Info, kernel_detail));

    // Kernel BTF, the layout and tracepoints read from it.
    items.extend(btf_items(&facts.btf));

    // Ring buffer: BPF_MAP_TYPE_RINGBUF arrived in 5.8.
    items.push(match version {
        Some(v) if v >= (5, 8, 0) => {
            CheckItem::new("BPF ring buffer", Status::Ok, "kernel 5.8 or later")
        }
        Some((major, minor, _)) => CheckItem::new(
            "BPF ring buffer",
            Status::Missing,
            format!("kernel {major}.{minor} has none (5.8+)"),
        )
        .fix("upgrade to kernel 5.8 or later: reaper's events travel in a BPF ring buffer"),
        None => CheckItem::new(
            "BPF ring buffer",
            Status::Warn,
            "unknown: cannot read the kernel version",
        )
        .fix("reaper needs kernel 5.8 or later"),
    });

    // pidfd: reaper signals only through pidfds, so a reused pid is never hit.
    items.push(match &facts.pidfd {
        Ok(()) => CheckItem::new("pidfd", Status::Ok, "pidfd_open works"),
        Err(PidfdError::NotSupported) => CheckItem::new(
            "pidfd",
            Status::Missing,
            "pidfd_open is not implemented (kernel before 5.3)",
        )
        .fix("upgrade to kernel 5.3 or later: reaper signals through pidfds only"),
        Err(PidfdError::Other(err)) => CheckItem::new(
            "pidfd",
            Status::Missing,
            format!("pidfd_open on our own pid failed: {err}"),
        )
        .fix("allow the pidfd_open and pidfd_send_signal syscalls (seccomp filter?)"),
    });

    // RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps to it; later ones to the memory cgroup.
    items.push(memlock_item(facts, version));

    CheckReport { items }
}

fn capability_items(caps: u64) -> Vec<CheckItem> {
    let mut items = Vec::new();
    // bpf_capable() and perfmon_capable() both accept CAP_SYS_ADMIN in place of the new caps.
    let (bpf, perfmon, admin) = (
        has(caps, CAP_BPF),
        has(caps, CAP_PERFMON),
        has(caps, CAP_SYS_ADMIN),
    );
    let ebpf = match (bpf && perfmon, admin) {
        (true, _) => CheckItem::new("CAP_BPF + CAP_PERFMON", Status::Ok, "load and attach eBPF"),
        (false, true) => CheckItem::new(
            "CAP_BPF + CAP_PERFMON",
            Status::Ok,
            "CAP_SYS_ADMIN stands in for them (load and attach eBPF)",
        ),
        (false, false) => {
            let lacking: Vec<&str> = [(bpf, "CAP_BPF"), (perfmon, "CAP_PERFMON")]
                .into_iter()
                .filter(|(held, _)| !held)
                .map(|(_, name)| name)
                .collect();
            CheckItem::new(
                "CAP_BPF + CAP_PERFMON",
                Status::Missing,
                format!("no {}: cannot load eBPF programs", lacking.join(" or ")),
            )
            .fix(CAPABILITY_FIX)
        }
    };
    items.push(ebpf);
    items.push(if has(caps, CAP_KILL) {
        CheckItem::new("CAP_KILL", Status::Ok, "signal targets of any user")
    } else {
        CheckItem::new(
            "CAP_KILL",
            Status::Missing,
            "cannot signal other users' processes",
        )
        .fix(CAPABILITY_FIX)
    });
    items.push(if has(caps, CAP_SYS_PTRACE) {
        CheckItem::new(
            "CAP_SYS_PTRACE",
            Status::Ok,
            "read /proc/PID/exe and /proc/PID/io of any user",
        )
    } else {
        CheckItem::new(
            "CAP_SYS_PTRACE",
            Status::Missing,
            "cannot read other users' /proc/PID/exe and /proc/PID/io",
        )
        .fix(CAPABILITY_FIX)
    });
    items.push(if has(caps, CAP_DAC_READ_SEARCH) {
        CheckItem::new(
            "CAP_DAC_READ_SEARCH",
            Status::Ok,
            "read /proc entries regardless of file modes",
        )
    } else {
        CheckItem::new(
            "CAP_DAC_READ_SEARCH",
            Status::Warn,
            "/proc entries with owner-only modes may be unreadable",
        )
        .fix(CAPABILITY_FIX)
    });
    items
}

const BTF_FIX: &str = "kernel built without CONFIG_DEBUG_INFO_BTF: reaper needs BTF \
                       (use a distribution kernel, or rebuild with CONFIG_DEBUG_INFO_BTF=y)";

fn btf_items(btf: &BtfFacts) -> Vec<CheckItem> {
    let mut items = Vec::new();
    let (offsets, tracepoints) = match btf {
        BtfFacts::Absent => {
            items.push(
                CheckItem::new(
                    "kernel BTF",
                    Status::Missing,
                    format!("{} does not exist", layout::VMLINUX_BTF),
                )
                .fix(BTF_FIX),
            );
            (None, None)
        }
        BtfFacts::Unreadable(err) => {
            items.push(
                CheckItem::new("kernel BTF", Status::Missing, err.clone())
                    .fix("make /sys/kernel/btf/vmlinux readable to reaper (sandbox hiding /sys?)"),
            );
            (None, None)
        }
        BtfFacts::Parsed {
            offsets,
            tracepoints,
        } => {
            items.push(CheckItem::new(
                "kernel BTF",
                Status::Ok,
                format!("{} parses", layout::VMLINUX_BTF),
            ));
            (Some(offsets), Some(tracepoints))
        }
    };

    items.push(match offsets {
        Some(Ok(())) => CheckItem::new(
            "kernel layout",
            Status::Ok,
            "every task_struct/signal_struct/mm_struct/pid offset resolved",
        ),
        Some(Err(err)) => CheckItem::new("kernel layout", Status::Missing, err.clone())
            .fix("this kernel's structs differ from what reaper reads: report it with `uname -r`"),
        None => CheckItem::new(
            "kernel layout",
            Status::Missing,
            "not checked: no kernel BTF",
        )
        .fix(BTF_FIX),
    });

    let arity = |name: &str| -> Option<Option<usize>> {
        tracepoints.map(|tps| tps.iter().find(|(n, _)| n == name).and_then(|(_, a)| *a))
    };
    for name in LIFECYCLE_TRACEPOINTS {
        let item = format!("tracepoint {name}");
        items.push(match arity(name) {
            Some(Some(args)) => CheckItem::new(item, Status::Ok, format!("in BTF ({args} args)")),
            Some(None) => CheckItem::new(item, Status::Missing, "not in this kernel's BTF")
                .fix("reaper needs this BTF tracepoint: use a kernel 5.8 or later with BTF"),
            None => {
                CheckItem::new(item, Status::Missing, "not checked: no kernel BTF").fix(BTF_FIX)
            }
        });
    }
    for name in SOCKET_TRACEPOINTS {
        let item = format!("tracepoint {name}");
        items.push(match arity(name) {
            Some(Some(args)) => CheckItem::new(
                item,
                Status::Ok,
                format!("in BTF ({args} args): socket activity counted in the kernel"),
            ),
            Some(None) => CheckItem::new(item, Status::Warn, "not in this kernel (6.3+)")
                .fix("none needed: activity falls back to /proc/PID/io"),
            None => CheckItem::new(item, Status::Warn, "not checked: no kernel BTF")
                .fix("none needed: activity falls back to /proc/PID/io"),
        });
    }
    items
}

fn memlock_item(facts: &Facts, version: Option<(u32, u32, u32)>) -> CheckItem {
    let Some((soft, hard)) = facts.memlock else {
        return CheckItem::new("RLIMIT_MEMLOCK", Status::Info, "cannot read the limit");
    };
    let limit = if soft == hard {
        human_bytes(soft)
    } else {
        format!("{} (hard {})", human_bytes(soft), human_bytes(hard))
    };
    let memcg = version.is_some_and(|v| v >= (5, 11, 0));
    let can_raise = hard == u64::MAX
        || facts
            .cap_eff
            .is_some_and(|caps| has(caps, CAP_SYS_RESOURCE));
    // The ring buffer alone is DEFAULT_RING_BYTES; the other maps are small.
    let enough = soft == u64::MAX || soft >= u64::from(DEFAULT_RING_BYTES) * 2;
    if memcg {
        CheckItem::new(
            "RLIMIT_MEMLOCK",
            Status::Info,
            format!("{limit} (not used: kernel 5.11+ charges BPF maps to the memory cgroup)"),
        )
    } else if enough || can_raise {
        CheckItem::new(
            "RLIMIT_MEMLOCK",
            Status::Ok,
            format!("{limit} (reaper raises it to unlimited where it can)"),
        )
    } else {
        CheckItem::new(
            "RLIMIT_MEMLOCK",
            Status::Warn,
            format!("{limit}: too low for the BPF maps on a kernel before 5.11"),
        )
        .fix("raise it: LimitMEMLOCK=infinity in the unit, or grant CAP_SYS_RESOURCE")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[u32]) -> u64 {
        list.iter().fold(0, |acc, &cap| acc | (1u64 << cap))
    }

    const ALL_CAPS: u64 = (1u64 << 41) - 1;

    fn tracepoints(present: &[&str]) -> Vec<(String, Option<usize>)> {
        LIFECYCLE_TRACEPOINTS
            .iter()
            .chain(&SOCKET_TRACEPOINTS)
            .map(|&n| (n.to_owned(), present.contains(&n).then_some(2)))
            .collect()
    }

    /// A 6.18 host, root with every capability: everything fine.
    fn good() -> Facts {
        Facts {
            euid: 0,
            cap_eff: Some(ALL_CAPS),
            kernel_release: Some("6.18.44-fc-v657".into()),
            machine: Some("x86_64".into()),
            btf: BtfFacts::Parsed {
                offsets: Ok(()),
                tracepoints: tracepoints(&[
                    "sched_process_fork",
                    "sched_process_exec",
                    "sched_process_exit",
                    "task_rename",
                    "sock_send_length",
                    "sock_recv_length",
                ]),
            },
            pidfd: Ok(()),
            memlock: Some((8 << 20, 8 << 20)),
        }
    }

    fn status(report: &CheckReport, item: &str) -> Status {
        report
            .get(item)
            .unwrap_or_else(|| panic!("no row {item:?} in\n{report}"))
            .status
    }

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\treaper\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000000c000080024\nCapBnd:\t000001ffffffffff\n";
        let eff = parse_cap_eff(status).unwrap();
        assert_eq!(
            eff,
            caps(&[
                CAP_DAC_READ_SEARCH,
                CAP_KILL,
                CAP_SYS_PTRACE,
                CAP_PERFMON,
                CAP_BPF
            ])
        );
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tnot-hex\n"), None);
        assert_eq!(parse_cap_eff(""), None);
    }

    #[test]
    fn parses_kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v657"), Some((6, 18, 44)));
        assert_eq!(parse_kernel_version("5.15.0-91-generic"), Some((5, 15, 0)));
        assert_eq!(parse_kernel_version("5.8"), Some((5, 8, 0)));
        assert_eq!(parse_kernel_version("6.1.0+"), Some((6, 1, 0)));
        assert_eq!(parse_kernel_version("4.19.0-rc1"), Some((4, 19, 0)));
        assert_eq!(parse_kernel_version("6.6-rc3"), Some((6, 6, 0)));
        assert_eq!(parse_kernel_version("6"), None);
        assert_eq!(parse_kernel_version(""), None);
        assert_eq!(parse_kernel_version("linux"), None);
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(8 << 20), "8 MiB");
        assert_eq!(human_bytes(65536), "64 KiB");
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(u64::MAX), "unlimited");
    }

    #[test]
    fn a_good_host_can_run() {
        let report = assess(&good());
        assert!(report.can_run(), "{report}");
        assert_eq!(report.with_status(Status::Missing).count(), 0);
        assert_eq!(report.with_status(Status::Warn).count(), 0, "{report}");
        for item in [
            "kernel BTF",
            "kernel layout",
            "BPF ring buffer",
            "pidfd",
            "CAP_KILL",
        ] {
            assert_eq!(status(&report, item), Status::Ok, "{item}");
        }
        assert_eq!(status(&report, "RLIMIT_MEMLOCK"), Status::Info);
        let text = report.to_string();
        assert!(text.ends_with("\nreaper can run here.\n"), "{text}");
        assert!(text.contains("Linux 6.18.44-fc-v657 x86_64"), "{text}");
    }

    #[test]
    fn without_capabilities_the_fix_names_them() {
        let report = assess(&Facts {
            euid: 1000,
            cap_eff: Some(0),
            ..good()
        });
        assert!(!report.can_run());
        for item in ["CAP_BPF + CAP_PERFMON", "CAP_KILL", "CAP_SYS_PTRACE"] {
            let row = report.get(item).unwrap();
            assert_eq!(row.status, Status::Missing, "{item}");
            assert_eq!(row.fix, CAPABILITY_FIX);
        }
        assert_eq!(status(&report, "CAP_DAC_READ_SEARCH"), Status::Warn);
        assert!(
            report
                .get("CAP_BPF + CAP_PERFMON")
                .unwrap()
                .detail
                .contains("no CAP_BPF or CAP_PERFMON")
        );
        let text = report.to_string();
        assert!(text.contains("uid 1000"), "{text}");
        assert!(
            text.contains("cannot run here: 3 required item(s) missing (1 warning)"),
            "{text}"
        );
    }

    #[test]
    fn cap_sys_admin_stands_in_for_bpf_and_perfmon() {
        let with = |list: &[u32]| {
            assess(&Facts {
                cap_eff: Some(caps(list)),
                ..good()
            })
        };
        let admin = with(&[CAP_SYS_ADMIN, CAP_KILL, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH]);
        assert!(admin.can_run(), "{admin}");
        assert!(
            admin
                .get("CAP_BPF + CAP_PERFMON")
                .unwrap()
                .detail
                .contains("CAP_SYS_ADMIN")
        );
        let only_bpf = with(&[CAP_BPF, CAP_KILL, CAP_SYS_PTRACE]);
        assert!(!only_bpf.can_run());
        let row = only_bpf.get("CAP_BPF + CAP_PERFMON").unwrap();
        assert_eq!(row.detail, "no CAP_PERFMON: cannot load eBPF programs");
        let exact = with(&[
            CAP_BPF,
            CAP_PERFMON,
            CAP_KILL,
            CAP_SYS_PTRACE,
            CAP_DAC_READ_SEARCH,
        ]);
        assert!(exact.can_run(), "{exact}");
        assert_eq!(exact.with_status(Status::Warn).count(), 0);
    }

    #[test]
    fn no_btf_is_missing_with_the_config_fix() {
        let report = assess(&Facts {
            btf: BtfFacts::Absent,
            ..good()
        });
        assert!(!report.can_run());
        let btf = report.get("kernel BTF").unwrap();
        assert_eq!(btf.status, Status::Missing);
        assert!(btf.fix.contains("CONFIG_DEBUG_INFO_BTF"), "{}", btf.fix);
        assert_eq!(status(&report, "kernel layout"), Status::Missing);
        assert_eq!(
            status(&report, "tracepoint sched_process_fork"),
            Status::Missing
        );
        assert_eq!(status(&report, "tracepoint sock_send_length"), Status::Warn);

        let unreadable = assess(&Facts {
            btf: BtfFacts::Unreadable("permission denied".into()),
            ..good()
        });
        assert!(!unreadable.can_run());
        assert_eq!(
            unreadable.get("kernel BTF").unwrap().detail,
            "permission denied"
        );
    }

    #[test]
    fn a_layout_error_is_missing() {
        let report = assess(&Facts {
            btf: BtfFacts::Parsed {
                offsets: Err("kernel BTF: struct task_struct has no member start_boottime".into()),
                tracepoints: tracepoints(&LIFECYCLE_TRACEPOINTS),
            },
            ..good()
        });
        assert!(!report.can_run());
        let row = report.get("kernel layout").unwrap();
        assert!(row.detail.contains("start_boottime"));
        assert!(!row.fix.is_empty());
    }

    #[test]
    fn socket_tracepoints_are_optional() {
        let report = assess(&Facts {
            btf: BtfFacts::Parsed {
                offsets: Ok(()),
                tracepoints: tracepoints(&LIFECYCLE_TRACEPOINTS),
            },
            ..good()
        });
        assert!(report.can_run(), "{report}");
        for name in SOCKET_TRACEPOINTS {
            let row = report.get(&format!("tracepoint {name}")).unwrap();
            assert_eq!(row.status, Status::Warn);
            assert!(
                row.fix.contains("activity falls back to /proc/PID/io"),
                "{}",
                row.fix
            );
        }
        assert!(report.to_string().ends_with("can run here (2 warnings).\n"));

        let no_exec = assess(&Facts {
            btf: BtfFacts::Parsed {
                offsets: Ok(()),
                tracepoints: tracepoints(&[
                    "sched_process_fork",
                    "sched_process_exit",
                    "task_rename",
                ]),
            },
            ..good()
        });
        assert!(!no_exec.can_run());
        assert_eq!(
            status(&no_exec, "tracepoint sched_process_exec"),
            Status::Missing
        );
    }

    #[test]
    fn old_kernels_lack_the_ring_buffer_and_pidfd() {
        let report = assess(&Facts {
            kernel_release: Some("5.4.0-150-generic".into()),
            pidfd: Ok(()),
            ..good()
        });
        assert_eq!(status(&report, "BPF ring buffer"), Status::Missing);
        assert!(report.get("BPF ring buffer").unwrap().fix.contains("5.8"));

        let report = assess(&Facts {
            kernel_release: Some("4.19.0".into()),
            pidfd: Err(PidfdError::NotSupported),
            ..good()
        });
        let pidfd = report.get("pidfd").unwrap();
        assert_eq!(pidfd.status, Status::Missing);
        assert!(pidfd.fix.contains("5.3"));

        let report = assess(&Facts {
            kernel_release: None,
            machine: None,
            pidfd: Err(PidfdError::Other("Operation not permitted".into())),
            ..good()
        });
        assert_eq!(status(&report, "BPF ring buffer"), Status::Warn);
        assert_eq!(report.get("kernel").unwrap().detail, "uname failed");
        assert!(
            report
                .get("pidfd")
                .unwrap()
                .detail
                .contains("Operation not permitted")
        );
    }

    #[test]
    fn memlock_matters_only_before_5_11() {
        let old = |memlock, cap_eff| {
            assess(&Facts {
                kernel_release: Some("5.10.0".into()),
                memlock: Some(memlock),
                cap_eff: Some(cap_eff),
                ..good()
            })
        };
        let no_resource = ALL_CAPS & !(1 << CAP_SYS_RESOURCE);
        let low = old((64 << 10, 64 << 10), no_resource);
        let row = low.get("RLIMIT_MEMLOCK").unwrap();
        assert_eq!(row.status, Status::Warn);
        assert!(row.detail.starts_with("64 KiB"), "{}", row.detail);
        assert!(row.fix.contains("LimitMEMLOCK=infinity"));
        assert!(low.can_run(), "a warning does not stop reaper");
        assert_eq!(
            status(&old((64 << 10, 64 << 10), ALL_CAPS), "RLIMIT_MEMLOCK"),
            Status::Ok
        );
        assert_eq!(
            status(&old((64 << 10, u64::MAX), no_resource), "RLIMIT_MEMLOCK"),
            Status::Ok
        );
        let unlimited = old((u64::MAX, u64::MAX), no_resource);
        assert_eq!(
            unlimited.get("RLIMIT_MEMLOCK").unwrap().detail,
            "unlimited (reaper raises it to unlimited where it can)"
        );
        let new = assess(&good());
        assert!(new.get("RLIMIT_MEMLOCK").unwrap().detail.contains("8 MiB"));
    }

    #[test]
    fn the_table_is_aligned() {
        let items = vec![
            CheckItem::new("a", Status::Ok, "fine"),
            CheckItem::new("longer item", Status::Missing, "gone").fix("do this"),
            CheckItem::new("ümlaut", Status::Warn, "wide détail"),
        ];
        let table = render_table(&items);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "ITEM         STATUS   DETAIL       FIX");
        assert_eq!(lines[1], "a            ok       fine");
        assert_eq!(lines[2], "longer item  missing  gone         do this");
        assert_eq!(lines[3], "ümlaut       warn     wide détail");
        // Every STATUS starts in the same column (counted in characters).
        let status_column = |line: &str| line.chars().skip(13).take(4).collect::<String>();
        assert_eq!(status_column(lines[3]), "warn");
        assert_eq!(render_table(&[]), "ITEM  STATUS  DETAIL  FIX\n");
    }

    #[test]
    fn status_pads_in_format_strings() {
        assert_eq!(format!("[{:<7}]", Status::Ok), "[ok     ]");
        assert_eq!(Status::Missing.to_string(), "missing");
    }

    #[test]
    fn error_chains_are_one_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&err), "outer: inner");
    }

    /// The real host: gathering never panics, and every item has a row.
    #[test]
    fn inspecting_this_host_fills_every_row() {
        let report = inspect();
        for item in [
            "running as",
            "kernel",
            "kernel BTF",
            "kernel layout",
            "BPF ring buffer",
            "pidfd",
            "RLIMIT_MEMLOCK",
        ] {
            assert!(report.get(item).is_some(), "no {item} row in\n{report}");
        }
        for name in LIFECYCLE_TRACEPOINTS.iter().chain(&SOCKET_TRACEPOINTS) {
            assert!(report.get(&format!("tracepoint {name}")).is_some());
        }
        assert!(
            report
                .items
                .iter()
                .all(|i| i.status == Status::Ok || i.status == Status::Info || !i.fix.is_empty()),
            "every problem has a fix:\n{report}"
        );
    }
}
