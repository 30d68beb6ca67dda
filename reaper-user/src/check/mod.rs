//! `reaper check`: can reaper run on this host, as this user? And if not, what to change.
//!
//! [`facts`] gathers what is so (privileges, kernel BTF and the layout and tracepoints reaper
//! reads from it, kernel version and limits, and what the kill path's system calls do when
//! tried on a child the check starts); [`assess`] judges it into a [`CheckReport`]: one row per
//! item, `ok`, `missing` (reaper cannot run), `warn` (it runs, degraded) or `info`, each
//! problem with a one-line fix. Gathering never panics; whatever cannot be read becomes a row
//! saying so. Assessing is pure, so every verdict is tested on made-up facts.
mod assess;
pub(crate) mod facts;

use std::fmt;

pub use self::facts::{Call, ReapFacts, parse_kernel_version};
pub(crate) use self::{
    assess::assess,
    facts::{BtfFacts, Facts},
};

/// Capability numbers (`include/uapi/linux/capability.h`, through the `caps` crate).
pub const CAP_DAC_READ_SEARCH: u32 = caps::Capability::CAP_DAC_READ_SEARCH as u32;
pub const CAP_KILL: u32 = caps::Capability::CAP_KILL as u32;
pub const CAP_SYS_PTRACE: u32 = caps::Capability::CAP_SYS_PTRACE as u32;
pub(crate) const CAP_SYS_ADMIN: u32 = caps::Capability::CAP_SYS_ADMIN as u32;
pub(crate) const CAP_SYS_RESOURCE: u32 = caps::Capability::CAP_SYS_RESOURCE as u32;
pub const CAP_PERFMON: u32 = caps::Capability::CAP_PERFMON as u32;
pub const CAP_BPF: u32 = caps::Capability::CAP_BPF as u32;

/// The capabilities to grant a non-root reaper (or to keep in a service's bounding set).
pub const CAPABILITY_FIX: &str =
    "run as root or grant CAP_BPF,CAP_PERFMON,CAP_KILL,CAP_SYS_PTRACE,CAP_DAC_READ_SEARCH";

/// Inspects this host and this process: what `reaper check` prints.
pub fn inspect() -> CheckReport {
    assess(&Facts::gather())
}

/// What `reaper run` keeps once started with `config`, and why (one row per row of
/// [`crate::privileges::KEPT`]): kept, or given up because this mode does not use it.
pub fn kept_items(config: &crate::config::Config) -> Vec<CheckItem> {
    crate::privileges::KEPT
        .iter()
        .map(|k| {
            let item = format!("keeps {}", k.cap);
            if k.when.applies(config.mode) {
                CheckItem::new(item, Status::Info, format!("after start-up, in {}: {}", k.when.as_str(), k.why))
            } else {
                CheckItem::new(
                    item,
                    Status::Info,
                    format!(
                        "no: dropped at start-up in mode {:?} (needed in {}); a reload that needs it is refused: restart",
                        config.mode,
                        k.when.as_str()
                    ),
                )
            }
        })
        .collect()
}

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
    pub(crate) fn with_status(&self, status: Status) -> impl Iterator<Item = &CheckItem> {
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
pub(crate) fn render_table(items: &[CheckItem]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_numbers_are_the_kernels() {
        // include/uapi/linux/capability.h
        assert_eq!(
            [
                CAP_DAC_READ_SEARCH,
                CAP_KILL,
                CAP_SYS_PTRACE,
                CAP_SYS_ADMIN,
                CAP_SYS_RESOURCE,
                CAP_PERFMON,
                CAP_BPF
            ],
            [2, 5, 19, 21, 24, 38, 39]
        );
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
            "pidfd_open",
            "pidfd_send_signal",
            "pidfd_getfd",
            "kill ladder",
            "RLIMIT_MEMLOCK",
        ] {
            assert!(report.get(item).is_some(), "no {item} row in\n{report}");
        }
        for name in crate::probes::LIFECYCLE_TRACEPOINTS
            .iter()
            .chain(&crate::probes::SOCKET_TRACEPOINTS)
        {
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

    #[test]
    fn status_pads_in_format_strings() {
        assert_eq!(format!("[{:<7}]", Status::Ok), "[ok     ]");
        assert_eq!(Status::Missing.to_string(), "missing");
    }
}
