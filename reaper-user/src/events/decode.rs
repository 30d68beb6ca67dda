//! Ring buffer record → [`Event`]. Pure: no kernel, no I/O.
//!
//! Records are untrusted bytes: every record is length-checked before it is read, the kind is
//! checked with `TryFrom<u32>`, structs are copied out with `read_unaligned` (the ring buffer
//! aligns records to 8 bytes, but nothing here relies on it), and lengths inside a record are
//! bounded by the arrays they index. A bad record is an error value, never a panic.
use std::mem::size_of;

use bytes::Bytes;
use reaper_common::{
    ARGV_LEN, EXEC_ARGV_TRUNCATED, EXEC_FILENAME_TRUNCATED, EXEC_IMAGE_UNREAD, EventKind, ExecHead,
    ExitEvent, FILENAME_LEN, ForkEvent, Header, RenameEvent, UnknownKind,
};

use super::{Argv, Event, ExitStatus, Identity};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event header")]
    NoHeader { len: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record of {len} bytes, expected {expected}")]
    Length {
        kind: EventKind,
        len: usize,
        expected: usize,
    },
    #[error("exec record claims {field} of {len} bytes, more than {max}")]
    FieldLength {
        field: &'static str,
        len: u32,
        max: usize,
    },
}

impl From<UnknownKind> for DecodeError {
    fn from(UnknownKind(id): UnknownKind) -> Self {
        Self::UnknownKind(id)
    }
}

/// Copies a `T` out of the front of `bytes` if it is long enough.
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length was checked; T is a reaper-common #[repr(C)] type made only of
    // integers and byte arrays, for which every bit pattern is valid; read_unaligned makes no
    // alignment assumption.
    Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

fn record<T: Copy>(kind: EventKind, bytes: &[u8]) -> Result<T, DecodeError> {
    // The ring buffer hands out exactly the reserved size; anything else is not ours.
    if bytes.len() != size_of::<T>() {
        return Err(DecodeError::Length {
            kind,
            len: bytes.len(),
            expected: size_of::<T>(),
        });
    }
    read(bytes).ok_or(DecodeError::Length {
        kind,
        len: bytes.len(),
        expected: size_of::<T>(),
    })
}

/// A NUL-terminated (or full) byte array as a string, invalid UTF-8 replaced.
///
/// Valid UTF-8 (nearly every comm and path) is checked by `str::from_utf8`, whose ASCII fast
/// path reads a word at a time; `from_utf8_lossy`'s chunk iterator, run on every field of every
/// record, was 2.6 % of the daemon's samples in a spawn storm.
fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    let bytes = &bytes[..end];
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn bounded(field: &'static str, len: u32, max: usize) -> Result<usize, DecodeError> {
    let n = len as usize;
    if n > max {
        return Err(DecodeError::FieldLength { field, len, max });
    }
    Ok(n)
}

/// Decodes one ring buffer record. Fork, exit and rename records have exactly their struct's
/// size; exec records are their fixed part plus the path and argv bytes they carry.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: Header = read(bytes).ok_or(DecodeError::NoHeader { len: bytes.len() })?;
    let kind = EventKind::try_from(header.kind)?;
    let id = Identity::from_ns(header.tgid, header.start_time_ns);
    let time_ns = header.timestamp_ns;
    Ok(match kind {
        EventKind::Fork => {
            let ev: ForkEvent = record(kind, bytes)?;
            Event::Fork {
                id,
                time_ns,
                parent: Identity::from_ns(ev.parent_tgid, ev.parent_start_time_ns),
                uid: ev.uid,
                comm: c_str(&ev.comm),
            }
        }
        EventKind::Exec => {
            // Variable length: the fixed head, then only the path and argv bytes present (the
            // kernel copies just the used prefix of the record).
            let head: ExecHead = read(bytes).ok_or(DecodeError::Length {
                kind,
                len: bytes.len(),
                expected: size_of::<ExecHead>(),
            })?;
            let filename_len = bounded("filename", head.filename_len, FILENAME_LEN)?;
            let argv_len = bounded("argv", head.argv_len, ARGV_LEN)?;
            let filename_at = size_of::<ExecHead>();
            let argv_at = filename_at + filename_len;
            if bytes.len() != argv_at + argv_len {
                return Err(DecodeError::Length {
                    kind,
                    len: bytes.len(),
                    expected: argv_at + argv_len,
                });
            }
            let unread = head.flags & EXEC_IMAGE_UNREAD != 0;
            Event::Exec {
                id,
                time_ns: (!unread).then_some(time_ns),
                parent_pid: head.parent_tgid,
                uid: head.uid,
                comm: c_str(&head.comm),
                // Not read by the kernel (not a candidate at its exec): unknown, not empty.
                filename: (!unread).then(|| c_str(&bytes[filename_at..argv_at])),
                argv: if unread {
                    Argv::unknown()
                } else {
                    Argv::new(Bytes::copy_from_slice(&bytes[argv_at..]))
                },
                argv_truncated: head.flags & EXEC_ARGV_TRUNCATED != 0,
                filename_truncated: head.flags & EXEC_FILENAME_TRUNCATED != 0,
            }
        }
        EventKind::Exit => {
            let ev: ExitEvent = record(kind, bytes)?;
            Event::Exit {
                id,
                time_ns,
                status: ExitStatus(ev.exit_status),
                reaper_pid: ev.reaper_tgid,
            }
        }
        EventKind::Rename => {
            let ev: RenameEvent = record(kind, bytes)?;
            Event::Rename {
                id,
                time_ns,
                comm: c_str(&ev.comm),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use reaper_common::{COMM_LEN, EXEC_ARGV_TRUNCATED, EXEC_IMAGE_UNREAD};

    use super::*;

    fn as_bytes<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: test-only view of a padding-free #[repr(C)] value as bytes.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn header(kind: EventKind, tgid: u32) -> Header {
        Header {
            kind: kind as u32,
            tgid,
            timestamp_ns: 5_000_000_000,
            start_time_ns: 1_234_567_890,
        }
    }

    fn comm(s: &str) -> [u8; COMM_LEN] {
        let mut c = [0; COMM_LEN];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    fn exec_record(argv: &[u8], argv_len: u32, flags: u32) -> Vec<u8> {
        let head = ExecHead {
            header: header(EventKind::Exec, 42),
            parent_tgid: 7,
            uid: 1000,
            flags,
            filename_len: 9,
            argv_len,
            _pad: 0,
            comm: comm("true"),
        };
        // As the kernel sends it: the head, the path and the argv bytes it claims.
        let mut bytes = as_bytes(&head);
        bytes.extend_from_slice(b"/bin/true");
        bytes.extend_from_slice(argv);
        bytes.resize(
            size_of::<ExecHead>() + 9 + (argv_len as usize).min(ARGV_LEN),
            0,
        );
        bytes
    }

    #[test]
    fn decodes_fork() {
        let ev = ForkEvent {
            header: header(EventKind::Fork, 42),
            parent_tgid: 7,
            uid: 1000,
            parent_start_time_ns: 20_000_000,
            comm: comm("bash"),
        };
        let decoded = decode(&as_bytes(&ev)).unwrap();
        let Event::Fork {
            id,
            parent,
            uid,
            comm,
            ..
        } = decoded
        else {
            panic!("{decoded:?}")
        };
        assert_eq!(id, Identity::from_ns(42, 1_234_567_890));
        assert_eq!(parent, Identity::from_ns(7, 20_000_000));
        assert_eq!((uid, comm.as_str()), (1000, "bash"));
    }

    #[test]
    fn decodes_exec_with_argv_and_flags() {
        let decoded = decode(&exec_record(
            b"/bin/true\0-x\0\xff\0",
            15,
            EXEC_ARGV_TRUNCATED,
        ))
        .unwrap();
        let Event::Exec {
            id,
            parent_pid,
            filename,
            argv,
            argv_truncated,
            filename_truncated,
            comm,
            ..
        } = decoded
        else {
            panic!("not exec")
        };
        assert_eq!(id.pid, 42);
        assert_eq!(parent_pid, 7);
        assert_eq!(filename.as_deref(), Some("/bin/true"));
        assert_eq!(comm, "true");
        assert_eq!(argv.to_strings(), ["/bin/true", "-x", "\u{fffd}"]);
        assert!(argv_truncated);
        assert!(!filename_truncated);
    }

    #[test]
    fn fixed_strings_end_at_their_nul_and_keep_invalid_utf8_visible() {
        assert_eq!(c_str(b"true\0\0\0"), "true");
        assert_eq!(c_str(b"fifteen-bytes!!"), "fifteen-bytes!!");
        assert_eq!(c_str(b"a\xffb\0\xfe"), "a\u{fffd}b");
        assert_eq!(c_str("日本\0".as_bytes()), "日本");
        assert_eq!(c_str(b""), "");
    }

    #[test]
    fn decodes_exit_status() {
        let ev = ExitEvent {
            header: header(EventKind::Exit, 42),
            exit_status: 3 << 8,
            reaper_tgid: 1,
        };
        let Event::Exit {
            status, reaper_pid, ..
        } = decode(&as_bytes(&ev)).unwrap()
        else {
            panic!("not exit")
        };
        assert_eq!(
            (status.code(), status.signal(), reaper_pid),
            (Some(3), None, 1)
        );
        assert_eq!(ExitStatus(9).signal(), Some(9));
        assert_eq!(ExitStatus(9).code(), None);
        assert_eq!(ExitStatus(0x80 | 11).to_string(), "signal 11 (core)");
    }

    #[test]
    fn rejects_short_records_without_panicking() {
        let ev = RenameEvent {
            header: header(EventKind::Rename, 1),
            comm: comm("x"),
        };
        let full = as_bytes(&ev);
        for len in 0..full.len() {
            let err = decode(&full[..len]).unwrap_err();
            assert!(
                matches!(
                    err,
                    DecodeError::NoHeader { .. } | DecodeError::Length { .. }
                ),
                "len {len}: {err}"
            );
        }
        assert!(decode(&full).is_ok());
    }

    #[test]
    fn rejects_unknown_kinds() {
        for kind in [0u32, 5, 99, u32::MAX] {
            let mut h = header(EventKind::Fork, 1);
            h.kind = kind;
            let mut bytes = as_bytes(&h);
            bytes.resize(size_of::<ForkEvent>(), 0);
            assert_eq!(decode(&bytes), Err(DecodeError::UnknownKind(kind)));
        }
    }

    #[test]
    fn rejects_lengths_past_their_arrays() {
        let err = decode(&exec_record(b"", ARGV_LEN as u32 + 1, 0)).unwrap_err();
        assert!(
            matches!(err, DecodeError::FieldLength { field: "argv", .. }),
            "{err}"
        );
        // A record longer or shorter than its argv length says.
        let mut oversized = exec_record(b"a\0", 2, 0);
        oversized.push(0);
        assert!(matches!(
            decode(&oversized),
            Err(DecodeError::Length { .. })
        ));
        let mut short = exec_record(b"abc\0", 4, 0);
        short.pop();
        assert!(matches!(decode(&short), Err(DecodeError::Length { .. })));
        // An exec with an empty argv is just the fixed part and the path.
        let empty = exec_record(b"", 0, 0);
        assert_eq!(empty.len(), size_of::<ExecHead>() + 9);
        assert!(decode(&empty).is_ok());
    }

    #[test]
    fn an_exec_whose_image_was_not_read_has_unknown_path_and_argv_not_empty_ones() {
        let unread = decode(&head_only_exec_record()).unwrap();
        let Event::Exec { argv, filename, .. } = &unread else {
            panic!("{unread:?}")
        };
        assert!(argv.is_unknown(), "{argv:?}");
        assert_eq!(filename, &None);
        assert_eq!(unread.time_ns(), None, "nor its time");
        let line = unread.to_string();
        assert!(line.trim_start().starts_with("- exec "), "{line}");
        assert!(line.ends_with(" file=- argv=-"), "{line}");
        let empty = decode(&exec_record(b"", 0, 0)).unwrap();
        let Event::Exec { argv, filename, .. } = &empty else {
            panic!("{empty:?}")
        };
        assert!(!argv.is_unknown());
        assert_eq!(filename.as_deref(), Some("/bin/true"));
        assert_eq!(empty.time_ns(), Some(5_000_000_000));
        assert!(empty.to_string().ends_with(" argv=\"\""), "{empty}");
    }

    /// An exec record as the kernel sends it for a process whose image it did not read: the
    /// head alone.
    fn head_only_exec_record() -> Vec<u8> {
        let mut bytes = exec_record(b"", 0, EXEC_IMAGE_UNREAD);
        bytes.truncate(size_of::<ExecHead>());
        let at = core::mem::offset_of!(ExecHead, filename_len);
        bytes[at..at + 4].copy_from_slice(&0u32.to_ne_bytes());
        bytes
    }

    #[test]
    fn survives_arbitrary_bytes() {
        // A cheap deterministic sweep: every prefix of pseudo-random records, every kind id.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (state % 4500) as usize;
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            if bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&((state % 6) as u32).to_ne_bytes());
            }
            let _ = decode(&bytes);
        }
    }
}
