//! Kernel struct layouts from BTF, resolved at load time.
//!
//! The eBPF programs read `task_struct`, `signal_struct`, `mm_struct`, `linux_binprm`, `pid`
//! and `pid_namespace` fields at offsets this module finds in the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`). Nothing is hard-coded: these structs change between kernel
//! versions and configurations (and under `CONFIG_RANDSTRUCT`). Members nested in anonymous
//! structs and unions (as `mm_struct`'s are) are found by walking into them.
use btf_rs::{Btf, Struct, Type};
use reaper_common::{COMM_LEN, KernelFeatures, KernelOffsets};

/// Where the running kernel's BTF lives.
pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read kernel BTF from {path} (is CONFIG_DEBUG_INFO_BTF enabled?)")]
    Read {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {name}")]
    NoStruct { name: String },
    #[error("kernel BTF: struct {strukt} has no member {field}")]
    NoField { strukt: String, field: String },
    #[error("kernel BTF: {what} is not byte-aligned (bit offset {bits})")]
    Unaligned { what: String, bits: u32 },
    #[error("kernel BTF: {what} is not {want}")]
    Shape { what: String, want: String },
    #[error("kernel BTF has no tracepoint prototype {name}")]
    NoTracepoint { name: String },
    #[error("kernel BTF is malformed")]
    Btf(#[from] btf_rs::Error),
}

/// A member's position: its offset in bits, and its size in bits if it is a bit field (else
/// 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    bits: u32,
    bitfield_size: u32,
}

/// Opens the running kernel's BTF. Mapped where the kernel allows it (btf_sysfs_vmlinux_mmap()
/// in <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/sysfs_btf.c>; 6.12 and older
/// have no mmap there), so only the types looked up are parsed; read and parsed whole
/// elsewhere.
pub fn vmlinux() -> Result<Btf, LayoutError> {
    Btf::from_file_with_backend(VMLINUX_BTF, btf_rs::Backend::Mmap)
        .or_else(|_| Btf::from_file(VMLINUX_BTF))
        .map_err(|source| LayoutError::Read {
            path: VMLINUX_BTF.to_owned(),
            source,
        })
}

/// What the eBPF programs are handed at load time: where the fields they read are, and what
/// the kernel offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    pub offsets: KernelOffsets,
    pub features: KernelFeatures,
}

/// Resolves every offset the eBPF programs need, and the features they adapt to.
pub fn kernel_layout(btf: &Btf) -> Result<KernelLayout, LayoutError> {
    let task = find_struct(btf, "task_struct")?;
    let signal = find_struct(btf, "signal_struct")?;
    let mm = find_struct(btf, "mm_struct")?;
    let binprm = find_struct(btf, "linux_binprm")?;
    let pid = find_struct(btf, "pid")?;
    let upid = find_struct(btf, "upid")?;
    let pid_ns = find_struct(btf, "pid_namespace")?;
    let sock = find_struct(btf, "sock")?;
    let sock_common = find_struct(btf, "sock_common")?;
    let cred = find_struct(btf, "cred")?;
    // `kuid_t` is a typedef of an anonymous struct: found through `cred::uid`.
    let kuid = member_struct(btf, &cred, "cred", "uid")?;
    comm_array(btf, &task)?;
    // `socket_lock_t` is a typedef of an anonymous struct: found through `sock::sk_lock`.
    let socket_lock = member_struct(btf, &sock, "sock", "sk_lock")?;

    let byte = |s: &Struct, name: &str, field: &str| -> Result<u32, LayoutError> {
        let pos = member(btf, s, name, field)?;
        if pos.bits % 8 != 0 {
            return Err(LayoutError::Unaligned {
                what: format!("{name}.{field}"),
                bits: pos.bits,
            });
        }
        Ok(pos.bits / 8)
    };
    // A one-bit field is read as the byte that holds it: a load through a BTF-typed pointer
    // may cover a bit field's bytes whole (btf_struct_walk(), since 5.6:
    // <https://github.com/torvalds/linux/blob/v5.10/kernel/bpf/btf.c>), and a field of one bit
    // lies in one byte.
    let bitfield = |s: &Struct, name: &str, field: &str| -> Result<(u32, u32), LayoutError> {
        let pos = member(btf, s, name, field)?;
        if pos.bitfield_size != 1 {
            return Err(LayoutError::Shape {
                what: format!("{name}.{field}"),
                want: "a one-bit field".to_owned(),
            });
        }
        Ok((pos.bits / 8, pos.bits % 8))
    };
    let (is_byte, is_bit) = bitfield(&signal, "signal_struct", "is_child_subreaper")?;
    let (has_byte, has_bit) = bitfield(&signal, "signal_struct", "has_child_subreaper")?;
    // Optional: it only lets the rename program skip the rename every exec makes.
    let in_execve = match bitfield(&task, "task_struct", "in_execve") {
        Ok(found) => Some(found),
        Err(LayoutError::NoField { .. }) => None,
        Err(err) => return Err(err),
    };

    let offsets = KernelOffsets {
        ready: 1,
        task_pid: byte(&task, "task_struct", "pid")?,
        task_tgid: byte(&task, "task_struct", "tgid")?,
        task_real_parent: byte(&task, "task_struct", "real_parent")?,
        task_group_leader: byte(&task, "task_struct", "group_leader")?,
        task_start_boottime: byte(&task, "task_struct", "start_boottime")?,
        task_start_time: byte(&task, "task_struct", "start_time")?,
        task_signal: byte(&task, "task_struct", "signal")?,
        task_exit_code: byte(&task, "task_struct", "exit_code")?,
        task_mm: byte(&task, "task_struct", "mm")?,
        task_thread_pid: byte(&task, "task_struct", "thread_pid")?,
        signal_live: byte(&signal, "signal_struct", "live")?,
        signal_flags: byte(&signal, "signal_struct", "flags")?,
        signal_group_exit_code: byte(&signal, "signal_struct", "group_exit_code")?,
        signal_is_subreaper_byte: is_byte,
        signal_is_subreaper_bit: is_bit,
        signal_has_subreaper_byte: has_byte,
        signal_has_subreaper_bit: has_bit,
        mm_arg_start: byte(&mm, "mm_struct", "arg_start")?,
        mm_arg_end: byte(&mm, "mm_struct", "arg_end")?,
        binprm_filename: byte(&binprm, "linux_binprm", "filename")?,
        pid_level: byte(&pid, "pid", "level")?,
        pid_numbers: byte(&pid, "pid", "numbers")?,
        upid_size: u32::try_from(upid.size()).unwrap_or(u32::MAX),
        upid_ns: byte(&upid, "upid", "ns")?,
        pid_ns_child_reaper: byte(&pid_ns, "pid_namespace", "child_reaper")?,
        task_in_execve_byte: in_execve.map_or(0, |(byte, _)| byte),
        task_in_execve_bit: in_execve.map_or(0, |(_, bit)| bit),
        sock_family: byte(&sock, "sock", "__sk_common")?
            + byte(&sock_common, "sock_common", "skc_family")?,
        sock_owned: byte(&sock, "sock", "sk_lock")? + byte(&socket_lock, "socket_lock_t", "owned")?,
        task_comm: byte(&task, "task_struct", "comm")?,
        task_cred: byte(&task, "task_struct", "cred")?,
        cred_uid: byte(&cred, "cred", "uid")? + byte(&kuid, "kuid_t", "val")?,
    };
    let features = KernelFeatures {
        exit_has_group_dead: u32::from(tracepoint_arity(btf, "sched_process_exit")? >= 2),
        has_in_execve: u32::from(in_execve.is_some()),
    };
    Ok(KernelLayout { offsets, features })
}

/// Checks that `task_struct::comm` is what the programs load byte by byte: an array of
/// [`COMM_LEN`] one-byte elements (`char comm[TASK_COMM_LEN]`, include/linux/sched.h).
fn comm_array(btf: &Btf, task: &Struct) -> Result<(), LayoutError> {
    let shape = || LayoutError::Shape {
        what: "task_struct.comm".to_owned(),
        want: format!("char[{COMM_LEN}]"),
    };
    for m in &task.members {
        if btf.resolve_name(m).unwrap_or_default() != "comm" {
            continue;
        }
        let Type::Array(array) = btf.resolve_chained_type(m)? else {
            return Err(shape());
        };
        let byte_elements = match btf.resolve_chained_type(&array)? {
            Type::Int(int) => int.size() == 1,
            _ => false,
        };
        return if array.len() == COMM_LEN && byte_elements {
            Ok(())
        } else {
            Err(shape())
        };
    }
    Err(LayoutError::NoField {
        strukt: "task_struct".to_owned(),
        field: "comm".to_owned(),
    })
}

/// Number of arguments a BTF tracepoint passes (not counting the leading `void *` context):
/// `typedef void (*btf_trace_NAME)(void *, ARGS...)`.
pub(crate) fn tracepoint_arity(btf: &Btf, tracepoint: &str) -> Result<usize, LayoutError> {
    let name = format!("btf_trace_{tracepoint}");
    for ty in btf.resolve_types_by_name(&name).unwrap_or_default() {
        let Type::Typedef(td) = ty else { continue };
        let mut ty = btf.resolve_chained_type(&td)?;
        if let Type::Ptr(ptr) = &ty {
            ty = btf.resolve_chained_type(ptr)?;
        }
        if let Type::FuncProto(proto) = ty {
            return Ok(proto.parameters.len().saturating_sub(1));
        }
    }
    Err(LayoutError::NoTracepoint { name })
}

/// Whether the kernel's BTF has every one of these tracepoints.
pub fn has_tracepoints(btf: &Btf, tracepoints: &[&str]) -> bool {
    tracepoints
        .iter()
        .all(|tp| tracepoint_arity(btf, tp).is_ok())
}

fn find_struct(btf: &Btf, name: &str) -> Result<Struct, LayoutError> {
    btf.resolve_types_by_name(name)
        .unwrap_or_default()
        .into_iter()
        .find_map(|ty| match ty {
            // Skip forward declarations' empty shells; the definition has members.
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| LayoutError::NoStruct {
            name: name.to_owned(),
        })
}

fn member(btf: &Btf, s: &Struct, strukt: &str, field: &str) -> Result<Position, LayoutError> {
    find_member(btf, s, field, 0)?.ok_or_else(|| LayoutError::NoField {
        strukt: strukt.to_owned(),
        field: field.to_owned(),
    })
}

/// The struct (or union) type of `strukt`'s direct member `field`.
fn member_struct(btf: &Btf, s: &Struct, strukt: &str, field: &str) -> Result<Struct, LayoutError> {
    for m in &s.members {
        if btf.resolve_name(m).unwrap_or_default() == field {
            return aggregate(btf, btf.resolve_chained_type(m)?)?.ok_or_else(|| {
                LayoutError::NoStruct {
                    name: format!("{strukt}.{field}"),
                }
            });
        }
    }
    Err(LayoutError::NoField {
        strukt: strukt.to_owned(),
        field: field.to_owned(),
    })
}

/// Depth-first search for `field`, descending into anonymous struct and union members.
fn find_member(
    btf: &Btf,
    s: &Struct,
    field: &str,
    base_bits: u32,
) -> Result<Option<Position>, LayoutError> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let bits = base_bits + m.bit_offset();
        if name == field {
            return Ok(Some(Position {
                bits,
                bitfield_size: m.bitfield_size().unwrap_or(0),
            }));
        }
        if name.is_empty()
            && let Some(inner) = aggregate(btf, btf.resolve_chained_type(m)?)?
            && let Some(found) = find_member(btf, &inner, field, bits)?
        {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The struct or union behind typedefs and qualifiers, if `ty` is one.
fn aggregate(btf: &Btf, mut ty: Type) -> Result<Option<Struct>, LayoutError> {
    loop {
        ty = match ty {
            Type::Struct(s) | Type::Union(s) => return Ok(Some(s)),
            Type::Typedef(t) => btf.resolve_chained_type(&t)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                btf.resolve_chained_type(&t)?
            }
            Type::TypeTag(t) => btf.resolve_chained_type(&t)?,
            _ => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only where the kernel exposes BTF; `cargo xtask test` runs on such a kernel.
    fn host_btf() -> Option<Btf> {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: no {VMLINUX_BTF}");
            return None;
        }
        Some(vmlinux().expect("parse vmlinux BTF"))
    }

    #[test]
    fn resolves_every_offset_on_this_kernel() {
        let Some(btf) = host_btf() else { return };
        let KernelLayout {
            offsets: o,
            features,
        } = kernel_layout(&btf).expect("layout");
        assert_eq!(o.ready, 1);
        // pid and tgid are adjacent pid_t fields in every kernel since 2.6.
        assert_eq!(o.task_tgid, o.task_pid + 4);
        assert!(o.mm_arg_end > o.mm_arg_start, "arg_end follows arg_start");
        assert!(o.upid_size >= 12, "struct upid holds an int and a pointer");
        assert!(o.signal_is_subreaper_bit < 8 && o.signal_has_subreaper_bit < 8);
        assert_ne!(o.task_start_time, o.task_start_boottime);
        assert_ne!(
            (o.signal_is_subreaper_byte, o.signal_is_subreaper_bit),
            (o.signal_has_subreaper_byte, o.signal_has_subreaper_bit)
        );
        // in_execve: a one-bit field of task_struct (since 2.6.30; kept on 6.18).
        let found = member(
            &btf,
            &find_struct(&btf, "task_struct").unwrap(),
            "task_struct",
            "in_execve",
        )
        .expect("in_execve");
        assert_eq!(found.bitfield_size, 1);
        assert_eq!(features.has_in_execve, 1);
        // socket_lock_t { spinlock_t slock; int owned; ... }: `owned` follows the lock.
        assert!(o.sock_owned > 0, "sk_lock.owned follows the spinlock");
        // cred { atomic_long_t usage; kuid_t uid; … }: uid follows the count.
        assert!(o.cred_uid >= 4, "cred.uid follows the usage count");
        assert!(o.task_comm > 0 && o.task_cred > 0);
    }

    #[test]
    fn finds_members_nested_in_anonymous_aggregates() {
        let Some(btf) = host_btf() else { return };
        // mm_struct wraps nearly all of its fields in an anonymous struct (5.x and later).
        let mm = find_struct(&btf, "mm_struct").unwrap();
        let direct = mm
            .members
            .iter()
            .any(|m| btf.resolve_name(m).unwrap_or_default() == "arg_start");
        let found = member(&btf, &mm, "mm_struct", "arg_start").unwrap();
        assert!(found.bits > 0);
        if !direct {
            assert_eq!(found.bits % 64, 0, "an unsigned long is 8-byte aligned");
        }
    }

    #[test]
    fn reports_missing_members_by_name() {
        let Some(btf) = host_btf() else { return };
        let task = find_struct(&btf, "task_struct").unwrap();
        let err = member(&btf, &task, "task_struct", "no_such_field").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel BTF: struct task_struct has no member no_such_field"
        );
        assert!(matches!(
            find_struct(&btf, "no_such_struct_xyz"),
            Err(LayoutError::NoStruct { .. })
        ));
    }

    #[test]
    fn reads_tracepoint_arity() {
        let Some(btf) = host_btf() else { return };
        assert_eq!(tracepoint_arity(&btf, "sched_process_fork").unwrap(), 2);
        assert_eq!(tracepoint_arity(&btf, "sched_process_exec").unwrap(), 3);
        let exit = tracepoint_arity(&btf, "sched_process_exit").unwrap();
        assert!(exit == 1 || exit == 2, "task, and group_dead from 6.16");
        assert!(tracepoint_arity(&btf, "no_such_tracepoint").is_err());
    }
}
