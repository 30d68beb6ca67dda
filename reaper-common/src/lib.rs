//! The wire format between reaper's eBPF programs and its daemon.
//!
//! Every record in the ring buffer starts with a [`Header`] whose `kind` is one of the pinned
//! [`EventKind`] ids; the rest of the record is the kind's struct. All types are `#[repr(C)]`,
//! `Copy`, use `u32` flags instead of `bool` and carry explicit padding, so they have no implicit
//! padding and the same layout on both sides. The user side decodes them with a length check and
//! `read_unaligned`, never by transmuting kernel bytes.
#![no_std]

use core::mem::size_of;

/// Length of `task_struct::comm` (`TASK_COMM_LEN`, include/linux/sched.h).
pub const COMM_LEN: usize = 16;
/// Bytes of the exec'd path (`linux_binprm::filename`) kept; longer paths are cut and flagged.
pub const FILENAME_LEN: usize = 256;
/// Bytes of argv (NUL-separated, as in `/proc/PID/cmdline`) kept per exec; longer argv is cut
/// and flagged with [`EXEC_ARGV_TRUNCATED`]. A power of two, so the eBPF side can bound reads
/// with a mask the verifier understands.
pub const ARGV_LEN: usize = 4096;

/// `ExecEvent::flags`: argv was longer than [`ARGV_LEN`] and was cut.
pub const EXEC_ARGV_TRUNCATED: u32 = 1 << 0;
/// `ExecEvent::flags`: the filename was longer than [`FILENAME_LEN`] and was cut.
pub const EXEC_FILENAME_TRUNCATED: u32 = 1 << 1;
/// `ExecEvent::flags`: argv could not be read from the new process's memory.
pub const EXEC_ARGV_UNREADABLE: u32 = 1 << 2;
/// `ExecEvent::flags`: neither the path nor argv was read, on purpose, and the record is its
/// [`ExecHead`] alone, without a timestamp: the process was neither a candidate by its name
/// (its comm one of the rules' names or a runtime's, `WATCH_NAMES`) nor watched (`WATCHED`) at
/// its exec, so nothing in user space looks at its image. Not the same as an empty path or
/// argv: user space reads `/proc/PID/exe` and `/proc/PID/cmdline` if the process becomes a
/// candidate later (a rename, new rules).
pub const EXEC_IMAGE_UNREAD: u32 = 1 << 3;

/// The lifecycle programs in reaper's eBPF object, each named after the BTF tracepoint
/// (`tp_btf`) it attaches to. Without any of them reaper cannot follow processes.
pub const LIFECYCLE_TRACEPOINTS: [&str; 4] = [
    "sched_process_fork",
    "sched_process_exec",
    "sched_process_exit",
    "task_rename",
];

/// The bench's second floor on `sched_process_exec` (reaper-ebpf/src/floor.rs): an exec record
/// with the path and argv reaper's carries. `bench-load floor content` attaches it alone;
/// `cargo xtask bench` reads its run time by this name.
pub const EXEC_CONTENT_FLOOR: &str = "floor_sched_process_exec_content";

/// The socket activity programs, named likewise (kernel 6.3+): attached where the kernel has
/// both tracepoints; elsewhere target activity comes from `/proc/PID/io`.
pub const SOCKET_TRACEPOINTS: [&str; 2] = ["sock_send_length", "sock_recv_length"];

/// The program that stamps the model's last word (the target's last TCP receive) where the
/// socket programs are not attached (kernels before 6.3, or `/proc/PID/io` configured): named
/// after `tcp:tcp_rcv_space_adjust` (kernel 4.16+). Without it the last word is sampled.
pub const LAST_WORD_TRACEPOINTS: [&str; 1] = ["tcp_rcv_space_adjust"];

/// Pinned numeric ids of the event kinds. Never renumber: they are the wire format and the
/// index of the per-kind loss counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A new process (not a thread) was created.
    Fork = 1,
    /// A process replaced its program image.
    Exec = 2,
    /// The last thread of a process exited.
    Exit = 3,
    /// A process changed its `comm`.
    Rename = 4,
}

impl EventKind {
    /// Every kind, in id order.
    pub const ALL: [EventKind; 4] = [Self::Fork, Self::Exec, Self::Exit, Self::Rename];

    /// Position in [`EventKind::ALL`], for arrays with one slot per kind (the id minus one:
    /// ids start at 1).
    pub const fn index(self) -> usize {
        self as usize - 1
    }

    /// Lower-case name, used in logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Fork => "fork",
            Self::Exec => "exec",
            Self::Exit => "exit",
            Self::Rename => "rename",
        }
    }
}

// `index` is each kind's position in `ALL`.
const _: () = {
    let mut i = 0;
    while i < EventKind::ALL.len() {
        assert!(EventKind::ALL[i].index() == i);
        i += 1;
    }
};

/// Size of the per-kind counter arrays, indexed by the kind id (slot 0 is unused).
pub const KIND_SLOTS: u32 = 5;

/// The id is not one of the [`EventKind`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownKind(pub u32);

impl TryFrom<u32> for EventKind {
    type Error = UnknownKind;

    fn try_from(id: u32) -> Result<Self, UnknownKind> {
        match id {
            1 => Ok(Self::Fork),
            2 => Ok(Self::Exec),
            3 => Ok(Self::Exit),
            4 => Ok(Self::Rename),
            other => Err(UnknownKind(other)),
        }
    }
}

/// First in every record.
///
/// `(tgid, start_time_ns)` is a process's identity everywhere in reaper: PIDs are reused, the
/// pair is not.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// An [`EventKind`] id.
    pub kind: u32,
    /// The process id (thread-group id) the event is about.
    pub tgid: u32,
    /// When the event happened, `CLOCK_MONOTONIC` ns (`bpf_ktime_get_ns`; a fork's is the
    /// child's `task_struct::start_time`, the same clock's reading at its creation); 0 in an exec record
    /// whose image the kernel did not read ([`EXEC_IMAGE_UNREAD`]): nobody reads its time.
    pub timestamp_ns: u64,
    /// The process's start time: its group leader's `task_struct::start_boottime`, ns since
    /// boot. `/proc/PID/stat` field 22 is this value in clock ticks.
    pub start_time_ns: u64,
}

/// A new process: `sched_process_fork` where the child is a thread-group leader.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForkEvent {
    pub header: Header,
    /// The child's parent process (`real_parent->tgid`).
    pub parent_tgid: u32,
    /// Real uid of the creator, which the child inherits.
    pub uid: u32,
    /// The parent process's start time (ns since boot), completing its identity.
    pub parent_start_time_ns: u64,
    /// The child's `comm`, inherited from the parent.
    pub comm: [u8; COMM_LEN],
}

/// The fixed part of an exec record. On the wire an exec record is this, then
/// [`ExecHead::filename_len`] bytes of the path, then [`ExecHead::argv_len`] bytes of argv (the
/// eBPF side sends only the used prefix of an [`ExecEvent`]; both lengths are 0 and
/// [`EXEC_IMAGE_UNREAD`] set where it read neither); both sides read and write these fields by
/// name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecHead {
    pub header: Header,
    /// The parent process (`real_parent->tgid`).
    pub parent_tgid: u32,
    /// Real uid after the exec (setuid binaries change it).
    pub uid: u32,
    /// `EXEC_*` flags.
    pub flags: u32,
    /// Bytes of the path given to execve (`linux_binprm::filename`, at most
    /// [`FILENAME_LEN`] - 1, not NUL-terminated) that follow this head.
    pub filename_len: u32,
    /// Bytes of argv (at most [`ARGV_LEN`]) that follow the path.
    pub argv_len: u32,
    pub _pad: u32,
    /// `comm` after the exec (the basename of the exec'd path).
    pub comm: [u8; COMM_LEN],
}

/// A process replaced its image: `sched_process_exec`. Built in a per-CPU scratch slot; only
/// `head`, then the `head.filename_len` bytes of the path and the `head.argv_len` bytes of
/// argv that follow it in `data`, are sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub head: ExecHead,
    /// The path, then argv as NUL-separated strings (as in `/proc/PID/cmdline`) from the
    /// path's last byte on.
    pub data: [u8; FILENAME_LEN + ARGV_LEN],
}

/// The last thread of a process exited (`sched_process_exit` with `signal->live == 0`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitEvent {
    pub header: Header,
    /// The status `wait(2)` reports: exit code in bits 8..16, terminating signal in bits 0..7,
    /// core-dump flag 0x80.
    pub exit_status: u32,
    /// The process that inherits this one's children (`find_new_reaper` in kernel/exit.c):
    /// the nearest live child subreaper among the ancestors, or the pid namespace's init.
    pub reaper_tgid: u32,
}

/// A process changed its `comm` (`task_rename`, e.g. prctl(PR_SET_NAME) on its main thread).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenameEvent {
    pub header: Header,
    pub comm: [u8; COMM_LEN],
}

const _: () = assert!(size_of::<Header>() == 24);
const _: () = assert!(size_of::<ForkEvent>() == 56);
const _: () = assert!(size_of::<ExecHead>() == 48 + COMM_LEN);
const _: () = assert!(core::mem::offset_of!(ExecEvent, data) == size_of::<ExecHead>());
// The fork and exec programs store the comm as two u64 (and exec hashes them: `watch_name_bit`).
const _: () = assert!(core::mem::offset_of!(ExecHead, comm) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(ForkEvent, comm) % 8 == 0);
const _: () = assert!(size_of::<ExecEvent>() == size_of::<ExecHead>() + FILENAME_LEN + ARGV_LEN);
const _: () = assert!(size_of::<ExitEvent>() == 32);
const _: () = assert!(size_of::<RenameEvent>() == 40);
const _: () = assert!(ARGV_LEN.is_power_of_two() && FILENAME_LEN.is_power_of_two());

/// `SIGNAL_GROUP_EXIT` in `signal_struct::flags`: the whole group is exiting, and
/// `group_exit_code` holds its status. A flag value, not a layout; unchanged since 2.6.
/// <https://github.com/torvalds/linux/blob/v6.18/include/linux/sched/signal.h>
pub const SIGNAL_GROUP_EXIT: u32 = 0x0000_0004;

/// Byte offsets of the kernel struct fields the eBPF programs read, resolved from BTF
/// (`/sys/kernel/btf/vmlinux`) at load time and handed to the programs as a read-only global.
/// Nothing here is hard-coded: layouts differ across kernels and configurations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// Non-zero once user space filled this in; the programs emit nothing before that.
    pub ready: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_group_leader: u32,
    pub task_start_boottime: u32,
    /// `task_struct::start_time`: `CLOCK_MONOTONIC` ns at the task's creation.
    pub task_start_time: u32,
    pub task_signal: u32,
    pub task_exit_code: u32,
    pub task_mm: u32,
    pub task_thread_pid: u32,
    pub signal_live: u32,
    pub signal_flags: u32,
    pub signal_group_exit_code: u32,
    /// Byte offset of the byte holding the `is_child_subreaper` bit field.
    pub signal_is_subreaper_byte: u32,
    /// Bit index of `is_child_subreaper` within that byte.
    pub signal_is_subreaper_bit: u32,
    /// Byte offset of the byte holding the `has_child_subreaper` bit field.
    pub signal_has_subreaper_byte: u32,
    /// Bit index of `has_child_subreaper` within that byte.
    pub signal_has_subreaper_bit: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub binprm_filename: u32,
    pub pid_level: u32,
    pub pid_numbers: u32,
    /// `sizeof(struct upid)`.
    pub upid_size: u32,
    pub upid_ns: u32,
    pub pid_ns_child_reaper: u32,
    /// Byte offset of the byte holding `task_struct::in_execve` (meaningful only with
    /// [`KernelFeatures::has_in_execve`]).
    pub task_in_execve_byte: u32,
    /// Bit index of `in_execve` within that byte.
    pub task_in_execve_bit: u32,
    /// Byte offset of `sock_common::skc_family` within `struct sock` (`__sk_common` first).
    pub sock_family: u32,
    /// Byte offset of `socket_lock_t::owned` within `struct sock` (`sk_lock`): non-zero while
    /// a task holds the socket with lock_sock().
    pub sock_owned: u32,
    /// `task_struct::comm`, [`COMM_LEN`] bytes (its length checked in BTF at load time).
    pub task_comm: u32,
    /// `task_struct::cred`: the subjective credentials, what `current_uid()` reads.
    pub task_cred: u32,
    /// Byte offset of `cred::uid.val` (a `kuid_t`'s one member) within `struct cred`.
    pub cred_uid: u32,
}

const _: () = assert!(size_of::<KernelOffsets>() == 33 * 4);

impl KernelOffsets {
    /// All zero, `ready` included: what the eBPF objects are compiled with, before user space
    /// writes the running kernel's layout over it at load time.
    pub const UNSET: Self = Self {
        ready: 0,
        task_pid: 0,
        task_tgid: 0,
        task_real_parent: 0,
        task_group_leader: 0,
        task_start_boottime: 0,
        task_start_time: 0,
        task_signal: 0,
        task_exit_code: 0,
        task_mm: 0,
        task_thread_pid: 0,
        signal_live: 0,
        signal_flags: 0,
        signal_group_exit_code: 0,
        signal_is_subreaper_byte: 0,
        signal_is_subreaper_bit: 0,
        signal_has_subreaper_byte: 0,
        signal_has_subreaper_bit: 0,
        mm_arg_start: 0,
        mm_arg_end: 0,
        binprm_filename: 0,
        pid_level: 0,
        pid_numbers: 0,
        upid_size: 0,
        upid_ns: 0,
        pid_ns_child_reaper: 0,
        task_in_execve_byte: 0,
        task_in_execve_bit: 0,
        sock_family: 0,
        sock_owned: 0,
        task_comm: 0,
        task_cred: 0,
        cred_uid: 0,
    };
}

/// A `comm` read as two little-endian `u64` halves (the eBPF target is `bpfel`), with every byte after its first NUL
/// zeroed, as `bpf_get_current_comm()` returns it (strncpy() on 5.10, strscpy_pad() on 6.18:
/// <https://github.com/torvalds/linux/blob/v5.10/kernel/bpf/helpers.c>,
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/helpers.c>) and `WATCH_NAMES`
/// keys it. The task's own array may hold an older, longer name's bytes past the NUL: 5.10's
/// `__set_task_comm()` copies with strlcpy(), which does not pad
/// (<https://github.com/torvalds/linux/blob/v5.10/fs/exec.c>). Branch-light for the eBPF side:
/// the lowest set bit of `(w - 0x01…) & !w & 0x80…` marks the first zero byte of `w` exactly
/// (a false marker can only sit above a true one, where the borrow ran).
pub const fn comm_nul_padded(lo: u64, hi: u64) -> (u64, u64) {
    const fn before_first_nul(w: u64) -> Option<u64> {
        let zero = w.wrapping_sub(0x0101_0101_0101_0101) & !w & 0x8080_8080_8080_8080;
        if zero == 0 {
            return None;
        }
        // The lowest marker bit is bit 8k + 7 for the first zero byte k: keep bytes 0..k.
        let first = zero & zero.wrapping_neg();
        Some(w & ((first >> 7) - 1))
    }
    match before_first_nul(lo) {
        Some(lo) => (lo, 0),
        None => match before_first_nul(hi) {
            Some(hi) => (lo, hi),
            // No NUL in 16 bytes (the kernel always ends a comm with one: a read torn by a
            // rename in flight): the last byte becomes it, as the helper's copy does.
            None => (lo, hi & (u64::MAX >> 8)),
        },
    }
}

/// What the running kernel's tracepoints and structs offer beyond a layout, found in its BTF
/// at load time and handed to the programs as a read-only global beside [`KernelOffsets`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFeatures {
    /// Non-zero where `sched_process_exit` passes `bool group_dead` as its second argument
    /// (6.16+); older kernels pass only the task.
    pub exit_has_group_dead: u32,
    /// Non-zero where `task_struct` has the `in_execve` bit field (set by `bprm_execve()` for
    /// the whole exec).
    pub has_in_execve: u32,
}

const _: () = assert!(size_of::<KernelFeatures>() == 2 * 4);

/// `max_entries` of the per-pid maps (`WATCHED`, `EXIT_CLAIMED`) as compiled. User space
/// resizes them at load time from `kernel.pid_max` (see `reaper::probes`).
pub const WATCH_MAX: u32 = 16384;

/// Most process names watched from their exec on (the rules' `comm` names), and the
/// runtimes whose argv is kept (`WATCH_NAME_ARGV`), together.
pub const WATCH_NAMES_MAX: u32 = 64;

/// `WATCH_NAMES` value of a rule's name: a process exec'd under it is watched from its exec
/// on, and its exec record carries the path and argv.
pub const WATCH_NAME_TARGET: u32 = 1;

/// `WATCH_NAMES` value of a runtime's name (`node`, `bun`, ...): its exec record carries the
/// path and argv, and it is not watched. Such a runtime may take a rule's name later (Node's
/// `process.title`, through libuv's uv_set_process_title(), renames the process and writes
/// the title over its argv memory, so `/proc/PID/cmdline` then holds the title alone): the
/// argv it was exec'd with is what a rule's `argv_any` must be matched against.
pub const WATCH_NAME_ARGV: u32 = 2;

/// Bits of `WATCH_NAME_BITS`, the exec program's filter in front of its `WATCH_NAMES` lookup:
/// a name's bit is [`watch_name_bit`] of its key. 1024 bits (16 `u64` elements) keep a false
/// "maybe" rare with [`WATCH_NAMES_MAX`] names.
pub const WATCH_NAME_FILTER_BITS: u32 = 1024;

/// The bit of a `comm` (NUL-padded, as the kernel keeps it and `WATCH_NAMES` keys it) in the
/// exec program's name filter, from its two 8-byte halves read in native byte order (the eBPF
/// side loads them as two `u64`): a multiplicative hash.
pub const fn watch_name_bit(lo: u64, hi: u64) -> u32 {
    let word = lo ^ hi.rotate_left(29);
    (word.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - WATCH_NAME_FILTER_BITS.trailing_zeros()))
        as u32
}

/// [`watch_name_bit`] of a whole `comm` key, for user space.
pub fn watch_name_bit_of(comm: &[u8; COMM_LEN]) -> u32 {
    let (lo, hi) = comm.split_at(8);
    let half = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
    watch_name_bit(half(lo), half(hi))
}

const _: () = assert!(WATCH_NAME_FILTER_BITS.is_power_of_two() && WATCH_NAME_FILTER_BITS >= 64);

/// `max_entries` of `ACTIVITY` (one record per target) as compiled; resized likewise.
pub const ACTIVITY_MAX: u32 = 4096;

/// [`ActivityRecord::flags`]: a process descended from this target could not be added to
/// `WATCHED` (the map was full when it was forked), so its socket bytes are not counted and
/// the target's activity is incomplete: an idle verdict on it cannot be trusted.
pub const ACTIVITY_WATCH_INCOMPLETE: u32 = 1 << 0;

/// Socket activity of one target and its descendants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockActivity {
    /// The last byte sent or received by the target or a descendant, `CLOCK_MONOTONIC` ns
    /// (0: none yet).
    pub last_ns: u64,
    /// Bytes sent and received so far.
    pub bytes: u64,
    /// The last byte the target itself (not a descendant) received from an `AF_INET` or
    /// `AF_INET6` socket, `CLOCK_MONOTONIC` ns; 0 if none yet. For an agent CLI this is the
    /// model's last word: a tool it starts after that is what its turn waits on.
    pub last_net_recv_ns: u64,
}

/// The value of `ACTIVITY`, keyed by a target's tgid. User space creates the record when it
/// watches the target; the eBPF programs update it (and create it for a process watched by its
/// name from its exec on, before user space adopts it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivityRecord {
    pub activity: SockActivity,
    /// `ACTIVITY_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

impl ActivityRecord {
    /// Whether some descendant of the target went unwatched ([`ACTIVITY_WATCH_INCOMPLETE`]).
    pub const fn watch_incomplete(&self) -> bool {
        self.flags & ACTIVITY_WATCH_INCOMPLETE != 0
    }
}

const _: () = assert!(size_of::<SockActivity>() == 24);
const _: () = assert!(size_of::<ActivityRecord>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], three u64 and two u32, no implicit padding (size asserted above).
    unsafe impl aya::Pod for super::ActivityRecord {}
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers and byte arrays, with
    // no implicit padding (sizes asserted above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelFeatures {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Header {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `comm_nul_padded` of 16 raw bytes, as the eBPF side loads them.
    fn padded(raw: &[u8; COMM_LEN]) -> [u8; COMM_LEN] {
        let half = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
        let (lo, hi) = comm_nul_padded(half(&raw[..8]), half(&raw[8..]));
        let mut out = [0; COMM_LEN];
        out[..8].copy_from_slice(&lo.to_le_bytes());
        out[8..].copy_from_slice(&hi.to_le_bytes());
        out
    }

    #[test]
    fn comm_bytes_after_the_first_nul_are_zeroed() {
        // "true" over an older "bash-longername": strlcpy() left the old tail.
        assert_eq!(
            padded(b"true\0longername\0"),
            *b"true\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        assert_eq!(padded(b"\0abcdefghijklmn\0"), [0; COMM_LEN]);
        assert_eq!(padded(b"abcdefg\0ijklmno\0"), *b"abcdefg\0\0\0\0\0\0\0\0\0");
        // The NUL in the second half; bytes of 0x01 and 0x80 (the trick's constants) kept.
        assert_eq!(
            padded(b"\x01\x80\x81cdefghij\0\xffmn\0"),
            *b"\x01\x80\x81cdefghij\0\0\0\0\0"
        );
        assert_eq!(padded(b"abcdefghijklmno\0"), *b"abcdefghijklmno\0");
        // A torn read without any NUL ends like the helper's copy.
        assert_eq!(padded(b"abcdefghijklmnop"), *b"abcdefghijklmno\0");
    }

    #[test]
    fn every_single_nul_position_keeps_exactly_the_bytes_before_it() {
        for at in 0..COMM_LEN {
            let mut raw = [0xa5u8; COMM_LEN];
            raw[at] = 0;
            let mut want = [0u8; COMM_LEN];
            want[..at].fill(0xa5);
            assert_eq!(padded(&raw), want, "NUL at {at}");
        }
    }
}
