//! Classic tracepoints: their record layout, read from tracefs at load time.
//!
//! reaper's lifecycle probes are BTF tracepoints and need none of this. Some events exist only
//! as classic tracepoints, though (`sock:sock_send_length`, from kernel 6.3, for one), and a
//! classic tracepoint hands its program a flat record whose fields sit at offsets that change
//! between kernels. The record is declared by `TP_STRUCT__entry` in the kernel's
//! `include/trace/events/*.h`, and the kernel is free to reshape it:
//! `sched:sched_process_fork`'s comms were inline `char[16]` arrays in 6.1 (`child_pid` at
//! offset 44) and are `__data_loc` strings in 6.18 (`child_pid` at offset 20). See
//! <https://github.com/torvalds/linux/blob/v6.18/include/trace/events/sched.h> and
//! <https://github.com/torvalds/linux/blob/v6.18/include/trace/events/sock.h>.
//!
//! So offsets are never hard-coded: each tracepoint's `format` file
//! (`<tracefs>/events/<category>/<name>/format`) is parsed when the probes load, and the
//! offsets found there are handed to the programs, as [`super::layout`] does with BTF.
use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

/// Where tracefs is mounted on current systems, and where reaper mounts it if nobody has.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The older location, through debugfs (which automounts tracefs there).
pub const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Why a `format` file could not be understood. Line numbers count from 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("the tracepoint format is empty")]
    Empty,
    #[error("the tracepoint format has no `{what}` line")]
    Missing { what: &'static str },
    #[error("line {line}: tracepoint ID {value:?} is not a number")]
    BadId { line: usize, value: String },
    #[error("line {line}: unexpected {text:?}")]
    UnexpectedLine { line: usize, text: String },
    #[error("line {line}: field line does not end with `;` (truncated?): {text:?}")]
    Truncated { line: usize, text: String },
    #[error("line {line}: {text:?} is not `key:value`")]
    MalformedProperty { line: usize, text: String },
    #[error("line {line}: field line has no `{property}:`")]
    MissingProperty { line: usize, property: &'static str },
    #[error("line {line}: `{property}:{value}` is not a valid number")]
    BadNumber {
        line: usize,
        property: &'static str,
        value: String,
    },
    #[error("line {line}: cannot read a C type and a field name from {decl:?}")]
    BadDeclaration { line: usize, decl: String },
    #[error("tracepoint {tracepoint} declares no fields")]
    NoFields { tracepoint: String },
    #[error("tracepoint {tracepoint} has no field {field} on this kernel")]
    NoSuchField { tracepoint: String, field: String },
}

/// Why tracefs, or a tracepoint's format in it, could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at {path} failed (needs CAP_SYS_ADMIN)")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("tracefs at {path} has no events/ directory")]
    NoEvents { path: PathBuf },
    #[error("{category:?}:{name:?} is not a tracepoint name")]
    BadName { category: String, name: String },
    #[error("this kernel has no tracepoint {category}:{name} ({path} does not exist)")]
    NoTracepoint {
        category: String,
        name: String,
        path: PathBuf,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
}

/// One field of a tracepoint's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The name, without any array suffix (`comm[16]` is `comm`).
    pub name: String,
    /// The C type as the kernel declares it, array suffix included: `pid_t`, `char[16]`,
    /// `void *`, `__data_loc char[]`.
    pub c_type: String,
    /// Byte offset from the start of the record.
    pub offset: u32,
    /// Size in bytes at `offset` (4 for `__data_loc` and `__rel_loc` fields).
    pub size: u32,
    pub signed: bool,
    /// A dynamic field: the `u32` at `offset` holds `(len << 16) | data_offset`, the data
    /// offset counting from the start of the record.
    pub data_loc: bool,
    /// Like `data_loc`, but the data offset counts from the end of this field.
    pub rel_loc: bool,
}

impl Field {
    /// This field's bytes in a record (a dynamic field's data, not its locator); `None` if the
    /// record is too short for it.
    pub fn bytes<'a>(&self, record: &'a [u8]) -> Option<&'a [u8]> {
        let start = usize::try_from(self.offset).ok()?;
        let end = start.checked_add(usize::try_from(self.size).ok()?)?;
        let raw = record.get(start..end)?;
        if !self.data_loc && !self.rel_loc {
            return Some(raw);
        }
        let locator = u32::from_ne_bytes(raw.get(..4)?.try_into().ok()?);
        let len = (locator >> 16) as usize;
        let data = (locator & 0xffff) as usize + if self.rel_loc { end } else { 0 };
        record.get(data..data.checked_add(len)?)
    }
}

/// A tracepoint's `format` file, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracepointFormat {
    pub name: String,
    /// The event id (what `perf_event_open` takes as `config`).
    pub id: u32,
    /// In file order: the common fields (`common_type`, `common_pid`, …) first.
    pub fields: Vec<Field>,
}

impl TracepointFormat {
    pub fn field(&self, name: &str) -> Result<&Field, FormatError> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| FormatError::NoSuchField {
                tracepoint: self.name.clone(),
                field: name.to_owned(),
            })
    }
}

/// Parses the text of a tracefs `format` file:
///
/// ```text
/// name: sched_process_fork
/// ID: 366
/// format:
///         field:unsigned short common_type;       offset:0;       size:2; signed:0;
///         …
///         field:__data_loc char[] parent_comm;    offset:8;       size:4; signed:0;
///
/// print fmt: "comm=%s pid=%d …", …
/// ```
pub fn parse_format(text: &str) -> Result<TracepointFormat, FormatError> {
    if text.trim().is_empty() {
        return Err(FormatError::Empty);
    }
    let mut name = None;
    let mut id = None;
    let mut in_format = false;
    let mut fields = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with("print fmt:") {
            break; // how `cat trace` prints the record: nothing about its layout
        }
        if in_format {
            fields.push(parse_field(line, trimmed)?);
        } else if let Some(value) = trimmed.strip_prefix("name:") {
            name = Some(value.trim().to_owned());
        } else if let Some(value) = trimmed.strip_prefix("ID:") {
            let value = value.trim();
            id = Some(value.parse().map_err(|_| FormatError::BadId {
                line,
                value: value.to_owned(),
            })?);
        } else if trimmed == "format:" {
            in_format = true;
        } else {
            return Err(FormatError::UnexpectedLine {
                line,
                text: trimmed.to_owned(),
            });
        }
    }
    let name = name
        .filter(|n| !n.is_empty())
        .ok_or(FormatError::Missing { what: "name:" })?;
    let id = id.ok_or(FormatError::Missing { what: "ID:" })?;
    if !in_format {
        return Err(FormatError::Missing { what: "format:" });
    }
    if fields.is_empty() {
        return Err(FormatError::NoFields { tracepoint: name });
    }
    Ok(TracepointFormat { name, id, fields })
}

/// `field:TYPE NAME;\toffset:N;\tsize:N;\tsigned:N;` (already trimmed).
fn parse_field(line: usize, text: &str) -> Result<Field, FormatError> {
    let Some(body) = text.strip_suffix(';') else {
        return Err(FormatError::Truncated {
            line,
            text: text.to_owned(),
        });
    };
    let (mut decl, mut offset, mut size, mut signed) = (None, None, None, None);
    for part in body.split(';') {
        let part = part.trim();
        let Some((key, value)) = part.split_once(':') else {
            return Err(FormatError::MalformedProperty {
                line,
                text: part.to_owned(),
            });
        };
        let value = value.trim();
        let number = |property: &'static str| {
            value.parse::<u32>().map_err(|_| FormatError::BadNumber {
                line,
                property,
                value: value.to_owned(),
            })
        };
        match key.trim() {
            "field" => decl = Some(value),
            "offset" => offset = Some(number("offset")?),
            "size" => size = Some(number("size")?),
            "signed" => {
                signed = Some(match number("signed")? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(FormatError::BadNumber {
                            line,
                            property: "signed",
                            value: value.to_owned(),
                        });
                    }
                });
            }
            _ => {} // a property added by a newer kernel: not needed for the layout
        }
    }
    let missing = |property| FormatError::MissingProperty { line, property };
    let decl = decl.ok_or(missing("field"))?;
    let (c_type, name) = parse_declaration(decl).ok_or_else(|| FormatError::BadDeclaration {
        line,
        decl: decl.to_owned(),
    })?;
    Ok(Field {
        data_loc: c_type.starts_with("__data_loc "),
        rel_loc: c_type.starts_with("__rel_loc "),
        name,
        c_type,
        offset: offset.ok_or(missing("offset"))?,
        size: size.ok_or(missing("size"))?,
        signed: signed.ok_or(missing("signed"))?,
    })
}

/// `char parent_comm[16]` → (`char[16]`, `parent_comm`): the kernel prints an array's
/// dimensions after the name; they belong to the type.
fn parse_declaration(decl: &str) -> Option<(String, String)> {
    let (c_type, name) = decl.trim().rsplit_once(char::is_whitespace)?;
    let (name, dims) = match name.find('[') {
        Some(at) => name.split_at(at),
        None => (name, ""),
    };
    let identifier = |s: &str| {
        s.chars().next().is_some_and(|c| !c.is_ascii_digit())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let c_type = c_type.trim();
    if c_type.is_empty() || !identifier(name) || !(dims.is_empty() || dims.ends_with(']')) {
        return None;
    }
    Some((format!("{c_type}{dims}"), name.to_owned()))
}

/// Serializes the check-then-mount in [`tracefs_root`] within this process.
static MOUNTING: Mutex<()> = Mutex::new(());

/// Where tracefs is: `/sys/kernel/tracing`, else `/sys/kernel/debug/tracing`; if neither has
/// `events/`, tracefs is mounted at `/sys/kernel/tracing` (needs CAP_SYS_ADMIN).
pub fn tracefs_root() -> Result<PathBuf, TracefsError> {
    let _guard = MOUNTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let found = || {
        [TRACEFS, DEBUGFS_TRACING]
            .into_iter()
            .map(Path::new)
            .find(|root| root.join("events").is_dir())
    };
    if let Some(root) = found() {
        return Ok(root.to_owned());
    }
    use nix::mount::{MsFlags, mount};
    let path = PathBuf::from(TRACEFS);
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(source) = mount(Some("tracefs"), &path, Some("tracefs"), flags, None::<&str>) {
        // Another process may have mounted it meanwhile.
        return found()
            .map(Path::to_owned)
            .ok_or(TracefsError::Mount { path, source });
    }
    if !path.join("events").is_dir() {
        return Err(TracefsError::NoEvents { path });
    }
    tracing::info!(path = %path.display(), "mounted tracefs (classic tracepoint formats are read from it)");
    Ok(path)
}

/// Reads and parses `<tracefs>/events/<category>/<name>/format`.
pub fn read_format(category: &str, name: &str) -> Result<TracepointFormat, TracefsError> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !valid(category) || !valid(name) {
        return Err(TracefsError::BadName {
            category: category.to_owned(),
            name: name.to_owned(),
        });
    }
    let path = tracefs_root()?
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TracefsError::NoTracepoint {
                category: category.to_owned(),
                name: name.to_owned(),
                path: path.clone(),
            }
        } else {
            TracefsError::Read {
                path: path.clone(),
                source,
            }
        }
    })?;
    parse_format(&text).map_err(|source| TracefsError::Format { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sched/sched_process_fork` on Linux 6.1 (x86_64): inline comm arrays. `signed:1` on the
    /// arrays because x86 `char` was signed until 6.2 built every arch with `-funsigned-char`;
    /// the ID differs from build to build.
    const FORK_6_1: &str = "\
name: sched_process_fork
ID: 315
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:1;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:1;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;

print fmt: \"comm=%s pid=%d child_comm=%s child_pid=%d\", REC->parent_comm, REC->parent_pid, REC->child_comm, REC->child_pid
";

    /// The same tracepoint on 6.18 (copied from this development machine's tracefs): the comms
    /// became `__data_loc` strings, and everything after them moved.
    const FORK_6_18: &str = "\
name: sched_process_fork
ID: 366
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;

print fmt: \"comm=%s pid=%d child_comm=%s child_pid=%d\", __get_str(parent_comm), REC->parent_pid, __get_str(child_comm), REC->child_pid
";

    /// `sock/sock_send_length` on 6.18 (this development machine).
    const SOCK_SEND_LENGTH_6_18: &str = "\
name: sock_send_length
ID: 2284
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * sk;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u16 family;\toffset:16;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:18;\tsize:2;\tsigned:0;
\tfield:int ret;\toffset:20;\tsize:4;\tsigned:1;
\tfield:int flags;\toffset:24;\tsize:4;\tsigned:1;

print fmt: \"sk address = %p, family = %s protocol = %s, length = %d, error = %d, flags = 0x%x\", REC->sk, __print_symbolic(REC->family, { 2, \"AF_INET\" }, { 10, \"AF_INET6\" }), __print_symbolic(REC->protocol, { 6, \"IPPROTO_TCP\" }, { 132, \"IPPROTO_SCTP\" }, { 262, \"IPPROTO_MPTCP\" }), !(REC->flags & 2) ? (REC->ret > 0 ? REC->ret : 0) : 0, REC->ret < 0 ? REC->ret : 0, REC->flags
";

    /// (name, offset, size, signed) of each field, in order.
    fn layout(format: &TracepointFormat) -> Vec<(&str, u32, u32, bool)> {
        format
            .fields
            .iter()
            .map(|f| (f.name.as_str(), f.offset, f.size, f.signed))
            .collect()
    }

    const COMMON: [(&str, u32, u32, bool); 4] = [
        ("common_type", 0, 2, false),
        ("common_flags", 2, 1, false),
        ("common_preempt_count", 3, 1, false),
        ("common_pid", 4, 4, true),
    ];

    #[test]
    fn linux_6_1_fork_has_inline_comms() {
        let f = parse_format(FORK_6_1).unwrap();
        assert_eq!(f.name, "sched_process_fork");
        assert_eq!(f.id, 315);
        let fields = layout(&f);
        assert_eq!(fields[..4], COMMON);
        assert_eq!(
            fields[4..],
            [
                ("parent_comm", 8, 16, true),
                ("parent_pid", 24, 4, true),
                ("child_comm", 28, 16, true),
                ("child_pid", 44, 4, true),
            ]
        );
        let comm = f.field("child_comm").unwrap();
        assert_eq!(comm.c_type, "char[16]");
        assert!(!comm.data_loc && !comm.rel_loc);
        assert_eq!(f.field("common_type").unwrap().c_type, "unsigned short");
        assert_eq!(f.field("child_pid").unwrap().c_type, "pid_t");
    }

    #[test]
    fn linux_6_18_fork_has_data_loc_comms() {
        let f = parse_format(FORK_6_18).unwrap();
        assert_eq!((f.name.as_str(), f.id), ("sched_process_fork", 366));
        let fields = layout(&f);
        assert_eq!(fields[..4], COMMON);
        assert_eq!(
            fields[4..],
            [
                ("parent_comm", 8, 4, false),
                ("parent_pid", 12, 4, true),
                ("child_comm", 16, 4, false),
                ("child_pid", 20, 4, true),
            ]
        );
        for name in ["parent_comm", "child_comm"] {
            let comm = f.field(name).unwrap();
            assert!(comm.data_loc, "{name} is dynamic");
            assert!(!comm.rel_loc);
            assert_eq!(comm.c_type, "__data_loc char[]");
        }
        assert!(!f.field("child_pid").unwrap().data_loc);
    }

    #[test]
    fn the_layout_moves_between_kernels() {
        let old = parse_format(FORK_6_1).unwrap();
        let new = parse_format(FORK_6_18).unwrap();
        let offset = |f: &TracepointFormat, name| f.field(name).unwrap().offset;
        assert_eq!(offset(&old, "child_pid"), 44);
        assert_eq!(offset(&new, "child_pid"), 20);
        assert_ne!(offset(&old, "parent_pid"), offset(&new, "parent_pid"));
        assert_ne!(
            old.field("child_comm").unwrap().data_loc,
            new.field("child_comm").unwrap().data_loc
        );
    }

    #[test]
    fn sock_send_length() {
        let f = parse_format(SOCK_SEND_LENGTH_6_18).unwrap();
        assert_eq!((f.name.as_str(), f.id), ("sock_send_length", 2284));
        assert_eq!(layout(&f)[..4], COMMON);
        let sk = f.field("sk").unwrap();
        assert_eq!((sk.c_type.as_str(), sk.offset, sk.size), ("void *", 8, 8));
        let family = f.field("family").unwrap();
        assert_eq!(
            (
                family.c_type.as_str(),
                family.offset,
                family.size,
                family.signed
            ),
            ("__u16", 16, 2, false)
        );
        let protocol = f.field("protocol").unwrap();
        assert_eq!((protocol.offset, protocol.size), (18, 2));
        let ret = f.field("ret").unwrap();
        assert_eq!(
            (ret.c_type.as_str(), ret.offset, ret.size, ret.signed),
            ("int", 20, 4, true)
        );
        assert_eq!(f.field("flags").unwrap().offset, 24);
        assert!(f.fields.iter().all(|f| !f.data_loc));
    }

    #[test]
    fn a_missing_field_names_the_tracepoint_and_the_field() {
        let f = parse_format(FORK_6_18).unwrap();
        let err = f.field("child_tgid").unwrap_err();
        assert_eq!(
            err,
            FormatError::NoSuchField {
                tracepoint: "sched_process_fork".into(),
                field: "child_tgid".into()
            }
        );
        let message = err.to_string();
        assert!(
            message.contains("sched_process_fork") && message.contains("child_tgid"),
            "{message}"
        );
    }

    #[test]
    fn field_bytes_follow_data_loc_and_inline_layouts() {
        // A 6.18 fork record: comms stored after the fixed part, at 24 and 30.
        let new = parse_format(FORK_6_18).unwrap();
        let mut record = vec![0u8; 24];
        record[8..12].copy_from_slice(&((6u32 << 16) | 24).to_ne_bytes());
        record[12..16].copy_from_slice(&100i32.to_ne_bytes());
        record[16..20].copy_from_slice(&((6u32 << 16) | 30).to_ne_bytes());
        record[20..24].copy_from_slice(&101i32.to_ne_bytes());
        record.extend_from_slice(b"bash\0\0make\0\0");
        assert_eq!(
            new.field("parent_comm").unwrap().bytes(&record),
            Some(&b"bash\0\0"[..])
        );
        assert_eq!(
            new.field("child_comm").unwrap().bytes(&record),
            Some(&b"make\0\0"[..])
        );
        assert_eq!(
            new.field("child_pid").unwrap().bytes(&record),
            Some(&101i32.to_ne_bytes()[..])
        );
        // A locator pointing past the end, or a record too short: None, no panic.
        assert_eq!(new.field("child_comm").unwrap().bytes(&record[..33]), None);
        assert_eq!(new.field("child_pid").unwrap().bytes(&record[..22]), None);

        // A 6.1 record: the comm is inline.
        let old = parse_format(FORK_6_1).unwrap();
        let mut record = vec![0u8; 48];
        record[28..32].copy_from_slice(b"make");
        let comm = old.field("child_comm").unwrap().bytes(&record).unwrap();
        assert_eq!(comm.len(), 16);
        assert_eq!(&comm[..5], b"make\0");

        // __rel_loc: the data offset counts from the end of the locator.
        let rel = parse_format(
            "name: t\nID: 1\nformat:\n\tfield:__rel_loc char[] s;\toffset:8;\tsize:4;\tsigned:0;\n",
        )
        .unwrap();
        let s = rel.field("s").unwrap();
        assert!(s.rel_loc && !s.data_loc);
        let mut record = vec![0u8; 12];
        record[8..12].copy_from_slice(&(3u32 << 16).to_ne_bytes());
        record.extend_from_slice(b"abc");
        assert_eq!(s.bytes(&record), Some(&b"abc"[..]));
    }

    #[test]
    fn malformed_formats_are_errors_not_panics() {
        let header = "name: t\nID: 7\nformat:\n";
        let with = |field: &str| parse_format(&format!("{header}{field}\n"));
        assert_eq!(parse_format(""), Err(FormatError::Empty));
        assert_eq!(parse_format(" \n\t\n"), Err(FormatError::Empty));
        assert!(matches!(
            with("\tfield:int x;\tsize:4;\tsigned:1;"),
            Err(FormatError::MissingProperty {
                line: 4,
                property: "offset"
            })
        ));
        assert!(matches!(
            with("\tfield:int x;\toffset:4;\tsize:four;\tsigned:1;"),
            Err(FormatError::BadNumber {
                line: 4,
                property: "size",
                ..
            })
        ));
        assert!(matches!(
            with("\tfield:int x;\toffset:-4;\tsize:4;\tsigned:1;"),
            Err(FormatError::BadNumber {
                property: "offset",
                ..
            })
        ));
        assert!(matches!(
            with("\tfield:int x;\toffset:4;\tsize:4;\tsigned:2;"),
            Err(FormatError::BadNumber {
                property: "signed",
                ..
            })
        ));
        // Cut off mid-line, as a short read would leave it.
        assert!(matches!(
            with("\tfield:int x;\toffset:4;\tsize:4;\tsig"),
            Err(FormatError::Truncated { line: 4, .. })
        ));
        assert!(matches!(
            with("\tfield:int x;\toffset:4;\tsize:4;\tsigned:"),
            Err(FormatError::Truncated { .. })
        ));
        // No `;` at all.
        assert!(matches!(
            with("\tfield:int x\toffset:4\tsize:4\tsigned:1"),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            with("\tfield:int x;\toffset 4;\tsize:4;\tsigned:1;"),
            Err(FormatError::MalformedProperty { .. })
        ));
        assert!(matches!(
            with("\tfield:x;\toffset:4;\tsize:4;\tsigned:1;"),
            Err(FormatError::BadDeclaration { .. })
        ));
        assert!(matches!(
            with("\tfield:int 9x;\toffset:4;\tsize:4;\tsigned:1;"),
            Err(FormatError::BadDeclaration { .. })
        ));
        assert!(matches!(
            with("\tfield:char c[16;\toffset:4;\tsize:16;\tsigned:1;"),
            Err(FormatError::BadDeclaration { .. })
        ));
        assert!(matches!(
            with("\toffset:4;\tsize:4;\tsigned:1;"),
            Err(FormatError::MissingProperty {
                property: "field",
                ..
            })
        ));
        assert_eq!(
            with(""),
            Err(FormatError::NoFields {
                tracepoint: "t".into()
            })
        );
        assert_eq!(
            parse_format("name: t\nformat:\n\tfield:int x;\toffset:0;\tsize:4;\tsigned:1;\n"),
            Err(FormatError::Missing { what: "ID:" })
        );
        assert_eq!(
            parse_format("ID: 1\nformat:\n"),
            Err(FormatError::Missing { what: "name:" })
        );
        assert_eq!(
            parse_format("name: t\nID: 1\n"),
            Err(FormatError::Missing { what: "format:" })
        );
        assert!(matches!(
            parse_format("name: t\nID: x1\nformat:\n"),
            Err(FormatError::BadId { line: 2, .. })
        ));
        assert!(matches!(
            parse_format("hello\n"),
            Err(FormatError::UnexpectedLine { line: 1, .. })
        ));

        // Every prefix of a real format: an error or a (shorter) format, never a panic.
        for (end, _) in FORK_6_18.char_indices() {
            let _ = parse_format(&FORK_6_18[..end]);
        }
    }

    /// The live kernel's format, through tracefs (mounted by the test if need be: run as root).
    #[test]
    fn reads_the_running_kernels_exec_format() {
        let f = read_format("sched", "sched_process_exec").unwrap();
        assert_eq!(f.name, "sched_process_exec");
        assert!(f.id > 0);
        assert_eq!(layout(&f)[..4], COMMON);
        let filename = f.field("filename").unwrap();
        assert!(
            filename.data_loc,
            "filename has always been a __data_loc string"
        );
        assert_eq!(filename.size, 4);
        for name in ["pid", "old_pid"] {
            let field = f.field(name).unwrap();
            assert_eq!(
                (field.c_type.as_str(), field.size, field.signed),
                ("pid_t", 4, true)
            );
            assert!(field.offset >= 8, "{name} comes after the common fields");
        }
        assert!(matches!(
            read_format("sched", "no_such_tracepoint"),
            Err(TracefsError::NoTracepoint { .. })
        ));
        assert!(matches!(
            read_format("sched/../..", "x"),
            Err(TracefsError::BadName { .. })
        ));
    }
}
