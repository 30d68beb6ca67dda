//! The only aya-facing module: loads reaper's eBPF object, hands it the kernel layout, attaches
//! the BTF tracepoints and gives out the ring buffer, the activity of watched targets and the
//! kernel side's failure counters.
//!
//! Attach types: BTF tracepoints (`tp_btf`) only. They need no tracefs, take typed
//! `task_struct *` arguments, and exist wherever kernel BTF does (5.5+); kprobes and fentry are
//! not assumed (many hosts, this one included, lack them).
//!
//! Watching targets, for the detector: [`Probes::watch`] each target (`pid == target`) and each
//! of its known descendants; the kernel adds descendants forked later by itself. When a process
//! cannot be added (the map is full), its bytes go uncounted and [`Probes::watch_failed`] says
//! so for its target until [`Probes::unwatch`]: an idle verdict on such a target cannot be
//! trusted, so it must not be reaped as idle. Only the socket activity source reads the
//! watch map; with `/proc/PID/io` a failed watch changes no evidence, and refusing the idle
//! verdict all the same is merely cautious. [`Probes::watch_failures`] feeds
//! `reaper_watch_failures_total`.
pub mod layout;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use std::collections::HashSet;

use aya_log::EbpfLogger;
use tracing_log::LogTracer;

use reaper_common::{
    ACTIVITY_MAX, ActivityRecord, COMM_LEN, EventKind, SockActivity, WATCH_NAME_ARGV,
    WATCH_NAME_FILTER_BITS, WATCH_NAME_TARGET, WATCH_NAMES_MAX, watch_name_bit_of,
};
pub use reaper_common::{LAST_WORD_TRACEPOINTS, LIFECYCLE_TRACEPOINTS, SOCKET_TRACEPOINTS};

/// The compiled eBPF object, built by build.rs from the `reaper-ebpf` crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reaper"));

/// Default ring buffer size, 1 MiB. Exec records carry only the path and argv present (≈ 100
/// bytes for `/bin/true`, 4.4 KiB at most), so a process's fork+exec+exit is ≈ 0.2 KiB: this
/// holds a backlog of ≈ 5,000 processes, and each CPU wakes the reader after its share of a
/// quarter of it. A 10,000-process storm loses nothing with it (measured); the consumer maps
/// the data pages twice, so this costs 2 MiB of RSS (4 MiB cost 8), and a smaller ring keeps
/// the programs' writes in fewer cold pages.
pub(crate) const DEFAULT_RING_BYTES: u32 = 1 << 20;

/// Most entries the per-pid maps (`WATCHED`, and `EXIT_CLAIMED` where it is used) get,
/// whatever `kernel.pid_max` says. Sized to `pid_max` a map cannot fill: its keys are tgids in
/// the initial pid namespace, all below `pid_max` <https://github.com/gregkh/linux/blob/v6.1.172/kernel/pid.c#L233-L234>; a full
/// preallocated hash map refuses a new key with `E2BIG`
/// <https://github.com/gregkh/linux/blob/v6.1.172/kernel/bpf/hashtab.c#L1003-L1005>. But systemd raises `pid_max` to 4194304
/// (`PID_MAX_LIMIT` on 64-bit <https://github.com/gregkh/linux/blob/v6.1.172/include/linux/threads.h#L34-L35>), and these maps cost 80
/// bytes of kernel memory per entry (measured: `memlock` in the map's fdinfo, 2,622,480 bytes
/// for 32768 entries on 6.18), charged to reaper's memory cgroup on 5.11+: 320 MiB each at
/// 4 M. 65536 entries cost 5 MiB per map and hold far more processes descended from agent
/// CLIs than a real host runs; past that, a refused process is counted and flagged on its
/// target rather than lost silently (see [`Probes::watch_failed`]).
pub const PER_PID_MAX_ENTRIES: u32 = 65536;

/// What the per-pid maps get when `kernel.pid_max` cannot be read: the kernel's default
/// (`PID_MAX_DEFAULT` <https://github.com/gregkh/linux/blob/v6.1.172/include/linux/threads.h#L28>).
pub(crate) const PID_MAX_DEFAULT: u32 = 32768;

/// Runtimes whose exec records carry the path and argv though no rule names them
/// (`WATCH_NAME_ARGV`): the ones an agent CLI or its wrapper runs on, which may take a rule's
/// name after their exec (Node's `process.title`) and write it over their argv, so
/// `/proc/PID/cmdline` no longer shows the flags a rule's `argv_any` looks for. Every other
/// exec's record is its head alone (`reaper_common::EXEC_IMAGE_UNREAD`).
pub(crate) const ARGV_KEPT_RUNTIMES: [&str; 3] = ["node", "bun", "deno"];

/// Where the kernel says how high pids go.
pub const PID_MAX_PATH: &str = "/proc/sys/kernel/pid_max";

/// Bytes a CPU submits before it wakes the reader: a quarter of the ring shared among the
/// possible CPUs (`None`: unknown, taken as one), so that all of them together leave at most
/// about a quarter of the ring unannounced, and three quarters free for the reader to wake.
///
/// Each wake-up in a storm costs the reader more than the events it then reads (the drain
/// starts with everything evicted, see `events::ring::POLL_MIN`). Over 4 × `storm 5000 1`, with
/// drains every 400 ms, an eighth of the ring woke the daemon ≈ 80 times and cost it 0.37–0.38
/// µs of CPU per event; a quarter ≈ 50–65 times and 0.30–0.35 µs (binaries alternated), with
/// no reserve failure.
pub(crate) fn wakeup_bytes(ring_bytes: u32, possible_cpus: Option<usize>) -> u64 {
    let cpus = possible_cpus.unwrap_or(1).max(1) as u64;
    (u64::from(ring_bytes) / 4 / cpus).max(1)
}

/// `max_entries` of the per-pid maps for this `kernel.pid_max` (`None`: unreadable).
pub fn per_pid_entries(pid_max: Option<u32>) -> u32 {
    pid_max
        .unwrap_or(PID_MAX_DEFAULT)
        .clamp(1, PER_PID_MAX_ENTRIES)
}

/// `max_entries` of the watch filters for this `kernel.pid_max` (`None`: unreadable):
/// `WATCHED_BY_KERNEL` (a byte per tgid, 8 to an element) and `WATCHED_BY_USER` (a bit per tgid,
/// 64 to an element), enough for every tgid below `pid_max`. A tgid beyond them (`pid_max`
/// raised later) is taken as maybe watched, at the cost of a hash lookup.
pub fn watch_filter_entries(pid_max: Option<u32>) -> (u32, u32) {
    let pids = pid_max.unwrap_or(PID_MAX_DEFAULT).max(1);
    (pids.div_ceil(8), pids.div_ceil(64))
}

/// `max_entries` of `ACTIVITY`, one record per watched target: never more than the per-pid
/// maps hold (every target is in `WATCHED`).
pub(crate) fn activity_entries(per_pid: u32) -> u32 {
    per_pid.min(ACTIVITY_MAX)
}

/// `BPF_NOEXIST` (include/uapi/linux/bpf.h): create a map element only if its key is new.
const BPF_NOEXIST: u64 = 1;

/// A process could not be watched for activity.
#[derive(Debug, thiserror::Error)]
#[error("could not watch pid {pid} for target {target}: the {map} map refused it")]
pub struct WatchError {
    pub pid: u32,
    pub target: u32,
    pub map: &'static str,
    #[source]
    pub source: aya::maps::MapError,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error("ring buffer size {bytes} must be a power of two and a multiple of the page size")]
    RingSize { bytes: u32 },
    #[error("loading reaper's eBPF object failed (needs root or CAP_BPF + CAP_PERFMON)")]
    Load(#[source] aya::EbpfError),
    #[error("reading kernel BTF for attaching failed")]
    Btf(#[source] aya::BtfError),
    #[error("eBPF object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("loading or attaching program {program} to tracepoint {tracepoint} failed")]
    Attach {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("reading the eBPF programs' log map failed")]
    Logger(#[source] aya_log::Error),
    #[error("eBPF map {name} is not of the expected type")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Load-time choices.
#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    /// Ring buffer size in bytes.
    pub ring_bytes: u32,
    /// Attach the socket activity programs if the kernel has their tracepoints.
    pub socket_activity: bool,
    /// `max_entries` of the per-pid maps; `None` (the default) sizes them from
    /// `kernel.pid_max` ([`per_pid_entries`]). Tests set a tiny one to see it fill.
    pub per_pid_entries: Option<u32>,
    /// Every exec record carries the exec's path and argv (`reaper events`). Off (the
    /// default), only a candidate's or a watched process's do; any other exec's record is its
    /// head alone (`reaper_common::EXEC_IMAGE_UNREAD`).
    pub full_exec_records: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            ring_bytes: DEFAULT_RING_BYTES,
            socket_activity: true,
            per_pid_entries: None,
            full_exec_records: false,
        }
    }
}

/// Loaded and attached programs. Dropping this detaches them.
pub struct Probes {
    ebpf: Ebpf,
    /// The eBPF programs' log lines (aya-log). Kept alive while the programs are (the programs
    /// refer to its map). Inside a tokio runtime a task forwards them to `tracing`; it is
    /// aborted when this is dropped.
    _logs: Logs,
    lost: PerCpuArray<MapData, u64>,
    read_faults: PerCpuArray<MapData, u64>,
    watch_failures: PerCpuArray<MapData, u64>,
    watched: HashMap<MapData, u32, u32>,
    /// `WATCHED_BY_USER`: a bit per tgid this side inserted into `watched`, set before the
    /// insert, so that the kernel's filtered lookups find it (only this side writes it).
    watched_by_user: Array<MapData, u64>,
    /// What `watched_by_user` holds: its only writer keeps the copy, so a change is one write.
    watched_by_user_bits: Vec<u64>,
    activity: HashMap<MapData, u32, ActivityRecord>,
    watch_names: HashMap<MapData, [u8; COMM_LEN], u32>,
    /// `WATCH_NAME_BITS`, the exec program's filter in front of `watch_names`: a name's bit is
    /// set before its key is inserted (only this side writes it).
    watch_name_bits: Array<MapData, u64>,
    /// What `watch_name_bits` holds.
    watch_name_bits_copy: [u64; WATCH_NAME_FILTER_BITS as usize / 64],
    socket_activity: bool,
    /// Whether `tcp:tcp_rcv_space_adjust` stamps the last word (socket programs not attached).
    last_word_tracepoint: bool,
    /// Targets a [`Probes::watch`] failed for, until they are unwatched.
    unwatched_targets: HashSet<u32>,
    /// [`Probes::watch`] calls that failed.
    user_watch_failures: u64,
}

impl Probes {
    /// Resolves the layout, loads the object and attaches every program. Events flow into the
    /// ring buffer from the moment this returns; take it with [`Probes::take_ring`].
    pub fn attach(options: ProbeOptions) -> Result<Self, ProbeError> {
        let page = page_size();
        let bytes = options.ring_bytes;
        if !bytes.is_power_of_two() || bytes < page {
            return Err(ProbeError::RingSize { bytes });
        }
        raise_memlock_limit();

        let btf = layout::vmlinux()?;
        let layout::KernelLayout { offsets, features } = layout::kernel_layout(&btf)?;
        let socket_activity =
            options.socket_activity && layout::has_tracepoints(&btf, &SOCKET_TRACEPOINTS);
        // Without the socket programs, the last word comes from the TCP receive path if the
        // kernel has its tracepoint (4.16+); else user space samples it.
        let last_word_tracepoint =
            !socket_activity && layout::has_tracepoints(&btf, &LAST_WORD_TRACEPOINTS);
        drop(btf);
        tracing::debug!(?offsets, ?features, "kernel layout from BTF");

        // Wake the reader once a quarter of the ring may be full: each CPU wakes it after
        // submitting its share of that; below it the reader's timer collects.
        let wakeup_bytes = wakeup_bytes(bytes, aya::util::nr_cpus().ok());
        let pid_max = read_pid_max();
        let per_pid_entries = options
            .per_pid_entries
            .unwrap_or_else(|| per_pid_entries(pid_max));
        let (filter_bytes, filter_bits) = watch_filter_entries(pid_max);
        tracing::debug!(?pid_max, per_pid_entries, "sizing the per-pid maps");
        let full_exec_records = u32::from(options.full_exec_records);
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("FEATURES", &features, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("FULL_EXEC_RECORDS", &full_exec_records, true)
            .map_max_entries("EVENTS", bytes)
            .map_max_entries("WATCHED", per_pid_entries)
            .map_max_entries("WATCHED_BY_KERNEL", filter_bytes)
            .map_max_entries("WATCHED_BY_USER", filter_bits)
            // Only kernels whose exit tracepoint lacks `group_dead` (before 6.16) use it.
            .map_max_entries(
                "EXIT_CLAIMED",
                if features.exit_has_group_dead != 0 {
                    1
                } else {
                    per_pid_entries
                },
            )
            .map_max_entries("ACTIVITY", activity_entries(per_pid_entries))
            .load(EBPF_OBJECT)
            .map_err(ProbeError::Load)?;

        // Before the programs load: they refer to the log map, which the logger owns.
        let logs = Logs::start(&mut ebpf)?;
        let btf = aya::Btf::from_sys_fs().map_err(ProbeError::Btf)?;
        let socket_programs: &[_] = if socket_activity {
            &SOCKET_TRACEPOINTS
        } else if last_word_tracepoint {
            &LAST_WORD_TRACEPOINTS
        } else {
            &[]
        };
        // Each program is named after its tracepoint.
        for &program in lifecycle_attach_order().iter().chain(socket_programs) {
            let tracepoint = program;
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(program)
                .ok_or(ProbeError::Missing {
                    what: "program",
                    name: program,
                })?
                .try_into()
                .map_err(|source| ProbeError::Attach {
                    program,
                    tracepoint,
                    source,
                })?;
            prog.load(tracepoint, &btf)
                .and_then(|()| prog.attach().map(drop))
                .map_err(|source| ProbeError::Attach {
                    program,
                    tracepoint,
                    source,
                })?;
        }

        let lost = take_counters(&mut ebpf, "LOST")?;
        let read_faults = take_counters(&mut ebpf, "READ_FAULTS")?;
        let watch_failures = take_counters(&mut ebpf, "WATCH_FAILURES")?;
        let watched = take_map(&mut ebpf, "WATCHED")?;
        let activity = take_map(&mut ebpf, "ACTIVITY")?;
        let watched_by_user = take_array(&mut ebpf, "WATCHED_BY_USER")?;
        let watch_names = ebpf.take_map("WATCH_NAMES").ok_or(ProbeError::Missing {
            what: "map",
            name: "WATCH_NAMES",
        })?;
        let watch_names = HashMap::try_from(watch_names).map_err(|source| ProbeError::Map {
            name: "WATCH_NAMES",
            source,
        })?;
        let watch_name_bits = take_array(&mut ebpf, "WATCH_NAME_BITS")?;
        drop(btf);
        // Parsing the kernel's BTF (three times: btf-rs for the layout, aya in
        // EbpfLoader::new() and for attaching) took ~25 MB that is free now.
        crate::heap::give_back();
        Ok(Self {
            ebpf,
            _logs: logs,
            lost,
            read_faults,
            watch_failures,
            watched,
            watched_by_user,
            watched_by_user_bits: vec![0; filter_bits as usize],
            activity,
            watch_names,
            watch_name_bits,
            watch_name_bits_copy: [0; WATCH_NAME_FILTER_BITS as usize / 64],
            socket_activity,
            last_word_tracepoint,
            unwatched_targets: HashSet::new(),
            user_watch_failures: 0,
        })
    }

    /// Whether socket activity is counted in the kernel (`sock:sock_{send,recv}_length`).
    pub(crate) fn socket_activity(&self) -> bool {
        self.socket_activity
    }

    /// Whether the kernel stamps the target's last network receive (`last_net_recv_ns`): by
    /// the socket programs, or by `tcp:tcp_rcv_space_adjust` in their place.
    pub(crate) fn last_word_in_kernel(&self) -> bool {
        self.socket_activity || self.last_word_tracepoint
    }

    /// The process names watched from their exec on (the rules' `comm`s), and with them
    /// [`ARGV_KEPT_RUNTIMES`]: replaces the set.
    pub fn set_watch_names<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let old: Vec<[u8; COMM_LEN]> = self.watch_names.keys().filter_map(Result::ok).collect();
        for key in old {
            let _ = self.watch_names.remove(&key);
        }
        // The kernel keeps TASK_COMM_LEN - 1 bytes of a name, NUL-padded.
        let key_of = |name: &str| {
            let mut key = [0u8; COMM_LEN];
            let len = name.len().min(COMM_LEN - 1);
            key[..len].copy_from_slice(&name.as_bytes()[..len]);
            key
        };
        let mut keys: Vec<([u8; COMM_LEN], &str, u32)> = names
            .into_iter()
            .map(|name| (key_of(name), name, WATCH_NAME_TARGET))
            .collect();
        for runtime in ARGV_KEPT_RUNTIMES {
            let key = key_of(runtime);
            if !keys.iter().any(|(k, ..)| *k == key) {
                keys.push((key, runtime, WATCH_NAME_ARGV));
            }
        }
        keys.truncate(WATCH_NAMES_MAX as usize);
        let mut bits = [0u64; WATCH_NAME_FILTER_BITS as usize / 64];
        for (key, ..) in &keys {
            let bit = watch_name_bit_of(key);
            bits[bit as usize / 64] |= 1 << (bit % 64);
        }
        // The filter first (the old names are gone from the map already): a name whose bit is
        // clear is never looked up.
        self.write_watch_name_bits(bits);
        for (key, name, kind) in keys {
            let bit = watch_name_bit_of(&key);
            if self.watch_name_bits_copy[bit as usize / 64] & (1 << (bit % 64)) == 0 {
                tracing::warn!(
                    name,
                    "could not watch a process name from exec: its filter bit could not be set"
                );
                continue;
            }
            if let Err(err) = self.watch_names.insert(key, kind, 0) {
                tracing::warn!(name, %err, "could not watch a process name from exec");
            }
        }
    }

    /// Writes the elements of `WATCH_NAME_BITS` that differ from `bits` (a failed one keeps its
    /// old value, in the copy too).
    fn write_watch_name_bits(&mut self, bits: [u64; WATCH_NAME_FILTER_BITS as usize / 64]) {
        for (index, (old, new)) in self.watch_name_bits_copy.iter_mut().zip(bits).enumerate() {
            if *old == new {
                continue;
            }
            match self.watch_name_bits.set(index as u32, new, 0) {
                Ok(()) => *old = new,
                Err(err) => {
                    tracing::warn!(%err, "could not write the exec program's name filter");
                }
            }
        }
    }

    /// Forwards the eBPF programs' log lines to `tracing` from now on, if they were attached
    /// before a tokio runtime ran (no-op otherwise).
    pub(crate) fn forward_logs(&mut self) {
        self._logs.forward();
    }

    /// `max_entries` of `WATCHED` (and the other per-pid maps) as the kernel reports it.
    pub fn watched_capacity(&self) -> Result<u32, aya::maps::MapError> {
        use aya::maps::IterableMap as _;
        Ok(self.watched.map().info()?.max_entries())
    }

    /// Tracks `pid`'s socket activity (and, from now on, that of the processes it forks) for
    /// `target`; call it with `pid == target` for the target itself. Creates the target's
    /// activity record if it has none yet (the kernel only updates records).
    ///
    /// On failure (a map full) `pid`'s bytes go uncounted: the failure is logged, counted in
    /// [`Probes::watch_failures`] and remembered for [`Probes::watch_failed`] until the target
    /// is unwatched.
    pub fn watch(&mut self, pid: u32, target: u32) -> Result<(), WatchError> {
        let result = self
            .activity
            .insert(target, ActivityRecord::default(), BPF_NOEXIST)
            .or_else(|err| {
                if is_errno(&err, libc::EEXIST) {
                    Ok(())
                } else {
                    Err(err)
                }
            })
            .map_err(|source| WatchError {
                pid,
                target,
                map: "ACTIVITY",
                source,
            })
            .and_then(|()| {
                // The filter first: from the insert on, the exit program must look `pid` up.
                self.filter_user_watch(pid, true)
                    .map_err(|source| WatchError {
                        pid,
                        target,
                        map: "WATCHED_BY_USER",
                        source,
                    })
            })
            .and_then(|()| {
                self.watched
                    .insert(pid, target, 0)
                    .map_err(|source| WatchError {
                        pid,
                        target,
                        map: "WATCHED",
                        source,
                    })
            });
        if let Err(err) = &result {
            self.user_watch_failures += 1;
            self.unwatched_targets.insert(target);
            tracing::warn!(
                pid,
                target,
                map = err.map,
                cause = %err.source,
                "could not watch a process for activity: its target will not be reaped as idle"
            );
        }
        result
    }

    /// Whether some process of `target`'s family could not be watched, so its socket activity
    /// is incomplete and an idle verdict on it cannot be trusted: a [`Probes::watch`] for it
    /// failed, or the kernel could not add a process it forked (`WATCHED` full). Stays true
    /// until [`Probes::unwatch`] of the target.
    pub fn watch_failed(&self, target: u32) -> bool {
        self.unwatched_targets.contains(&target)
            || self
                .activity
                .get(&target, 0)
                .is_ok_and(|record| record.watch_incomplete())
    }

    /// Stops tracking a target: forgets its activity (and any watch failure) and unwatches
    /// `pids` (it and descendants).
    pub fn unwatch(&mut self, target: u32, pids: impl IntoIterator<Item = u32>) {
        let _ = self.activity.remove(&target);
        // Each filter bit after its entry is gone; a bit left set only costs the kernel a
        // lookup.
        for pid in std::iter::once(target).chain(pids) {
            let gone = match self.watched.remove(&pid) {
                Ok(()) => true,
                Err(err) => is_errno(&err, libc::ENOENT),
            };
            if gone {
                let _ = self.filter_user_watch(pid, false);
            }
        }
        self.unwatched_targets.remove(&target);
    }

    /// `pid`, watched for some target, exited. The exit program removed it from `WATCHED` but
    /// cannot clear its bit in `WATCHED_BY_USER` (only this side writes that array); clears it
    /// here so the kernel's programs skip the lookup for whoever gets the pid next. Kept where
    /// `WATCHED` holds the pid again (reused meanwhile, e.g. forked into a watched family and
    /// inserted by the kernel): a set bit is only ever a lookup, a clear one must be true.
    pub fn exited(&mut self, pid: u32) {
        let set = self
            .watched_by_user_bits
            .get((pid / 64) as usize)
            .is_some_and(|word| (word >> (pid % 64)) & 1 != 0);
        if !set {
            return;
        }
        if let Err(aya::maps::MapError::KeyNotFound) = self.watched.get(&pid, 0) {
            let _ = self.filter_user_watch(pid, false);
        }
    }

    /// Whether `pid`'s bit in `WATCHED_BY_USER` is set, as the kernel reads it (a pid beyond
    /// the filter: true, the kernel takes it as maybe watched).
    pub fn user_filter(&self, pid: u32) -> bool {
        self.watched_by_user
            .get(&(pid / 64), 0)
            .map_or(true, |word| (word >> (pid % 64)) & 1 != 0)
    }

    /// Sets or clears `pid`'s bit in `WATCHED_BY_USER`. A pid beyond the filter needs none
    /// (the kernel takes it as maybe watched).
    fn filter_user_watch(&mut self, pid: u32, watched: bool) -> Result<(), aya::maps::MapError> {
        let index = pid / 64;
        let Some(word) = self.watched_by_user_bits.get_mut(index as usize) else {
            return Ok(());
        };
        let bit = 1u64 << (pid % 64);
        let new = if watched { *word | bit } else { *word & !bit };
        if new == *word {
            return Ok(());
        }
        self.watched_by_user.set(index, new, 0)?;
        *word = new;
        Ok(())
    }

    /// Socket bytes of `target` and its descendants so far, and when the last one moved.
    pub(crate) fn sock_activity(&self, target: u32) -> Option<SockActivity> {
        self.activity
            .get(&target, 0)
            .ok()
            .map(|record| record.activity)
    }

    /// Processes that could not be watched so far: the kernel's refusals (descendants born
    /// while `WATCHED` was full) plus failed [`Probes::watch`] calls.
    pub fn watch_failures(&self) -> u64 {
        sum_slot(&self.watch_failures, 0) + self.user_watch_failures
    }

    /// Kernel reads that faulted so far, per event kind (the events were not sent).
    pub(crate) fn read_faults(&self) -> KindCounts {
        per_kind(&self.read_faults)
    }

    /// The ring buffer every event goes through. `None` once taken.
    pub fn take_ring(&mut self) -> Option<Result<RingBuf<MapData>, ProbeError>> {
        let map = self.ebpf.take_map("EVENTS")?;
        Some(RingBuf::try_from(map).map_err(|source| ProbeError::Map {
            name: "EVENTS",
            source,
        }))
    }

    /// Reserve failures so far, summed over CPUs, per event kind.
    pub fn lost(&self) -> LostCounts {
        per_kind(&self.lost)
    }
}

/// The eBPF programs' log lines on their way to `tracing`.
enum Logs {
    /// Forwarded by this task.
    Forwarded(tokio::task::JoinHandle<()>),
    /// No tokio runtime yet (the daemon attaches before it starts any thread, to drop its
    /// capabilities first): the logger is kept so the programs' map stays valid, and
    /// [`Probes::forward_logs`] starts forwarding once a runtime runs.
    Held(Option<Box<EbpfLogger<LogTracer>>>),
}

impl Logs {
    fn start(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        let logger =
            EbpfLogger::init_with_logger(ebpf, LogTracer::new()).map_err(ProbeError::Logger)?;
        Ok(match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Logs::Forwarded(runtime.spawn(forward_logs(logger))),
            Err(_) => Logs::Held(Some(Box::new(logger))),
        })
    }

    /// Starts forwarding held lines, if a runtime runs now.
    fn forward(&mut self) {
        if let Logs::Held(held) = self
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
            && let Some(logger) = held.take()
        {
            *self = Logs::Forwarded(runtime.spawn(forward_logs(*logger)));
        }
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if let Logs::Forwarded(task) = self {
            task.abort();
        }
    }
}

/// Waits on the log ring buffer's fd and hands each record to `tracing` (records are rare: the
/// programs log only failures, rate-limited).
async fn forward_logs(logger: EbpfLogger<LogTracer>) {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the logger owns its ring buffer map fd and keeps it open and unchanged for as
    // long as the AsyncFd owns the logger.
    let mut logs = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(logs) => logs,
        Err(err) => {
            tracing::warn!(%err, "cannot poll the eBPF programs' log map; their failure reports are not shown");
            return;
        }
    };
    loop {
        let Ok(mut ready) = logs.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// The lifecycle programs in the order they are attached: the exit program first.
///
/// They attach one at a time, each verified just before (milliseconds), and a program not yet
/// attached sees nothing. Attached after the fork and exec programs, the exit program missed
/// the end of every process that forked or exec'd under them and ended before it was: entries
/// the start-up scan could not correct (those processes were gone by then) and only a
/// reconcile removed (measured: 17–135 in a start during a four-thread spawn storm). With the
/// exit program first, a process whose fork or exec is seen has its exit seen too; a fork, exec
/// or rename missed before its program is attached happened before the scan, which reads its
/// result from `/proc`.
pub(crate) fn lifecycle_attach_order() -> [&'static str; LIFECYCLE_TRACEPOINTS.len()] {
    let mut order = LIFECYCLE_TRACEPOINTS;
    order.sort_by_key(|&program| program != "sched_process_exit");
    order
}

/// A per-CPU counter slot, summed over CPUs.
fn sum_slot(counters: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    counters
        .get(&slot, 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(0)
}

/// A per-CPU counter array indexed by event kind id, summed over CPUs.
fn per_kind(counters: &PerCpuArray<MapData, u64>) -> KindCounts {
    let mut counts = KindCounts::default();
    for kind in EventKind::ALL {
        counts.set(kind, sum_slot(counters, kind as u32));
    }
    counts
}

fn is_errno(err: &aya::maps::MapError, errno: i32) -> bool {
    matches!(err, aya::maps::MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(errno))
}

/// `kernel.pid_max`, if readable.
fn read_pid_max() -> Option<u32> {
    std::fs::read_to_string(PID_MAX_PATH)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Ring buffer reserve failures per event kind: events the kernel could not hand over.
pub(crate) type LostCounts = KindCounts;

/// A count per event kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCounts([u64; EventKind::ALL.len()]);

impl KindCounts {
    pub(crate) fn get(&self, kind: EventKind) -> u64 {
        self.0[kind.index()]
    }

    pub(crate) fn set(&mut self, kind: EventKind, value: u64) {
        self.0[kind.index()] = value;
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

fn take_counters(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuArray<MapData, u64>, ProbeError> {
    let map = ebpf
        .take_map(name)
        .ok_or(ProbeError::Missing { what: "map", name })?;
    PerCpuArray::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn take_array(ebpf: &mut Ebpf, name: &'static str) -> Result<Array<MapData, u64>, ProbeError> {
    let map = ebpf
        .take_map(name)
        .ok_or(ProbeError::Missing { what: "map", name })?;
    Array::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn take_map<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, u32, V>, ProbeError> {
    let map = ebpf
        .take_map(name)
        .ok_or(ProbeError::Missing { what: "map", name })?;
    HashMap::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn page_size() -> u32 {
    u32::try_from(rustix::param::page_size()).unwrap_or(4096)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the memory cgroup.
/// Raising it needs CAP_SYS_RESOURCE, which a hardened service may not have: log, go on.
fn raise_memlock_limit() {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let unlimited = Rlimit {
        current: None,
        maximum: None,
    };
    if let Err(err) = setrlimit(Resource::Memlock, unlimited) {
        tracing::debug!(%err, "could not raise RLIMIT_MEMLOCK (not needed on 5.11+)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cpu_wakes_the_reader_after_its_share_of_a_quarter_of_the_ring() {
        assert_eq!(wakeup_bytes(1 << 20, Some(2)), 131072);
        assert_eq!(wakeup_bytes(1 << 20, None), 262144);
        assert_eq!(wakeup_bytes(4096, Some(4096)), 1);
    }

    #[test]
    fn per_pid_maps_follow_pid_max_up_to_the_cap() {
        assert_eq!(per_pid_entries(Some(32768)), 32768);
        assert_eq!(per_pid_entries(Some(1000)), 1000);
        // systemd's pid_max on 64-bit hosts (PID_MAX_LIMIT).
        assert_eq!(per_pid_entries(Some(4_194_304)), PER_PID_MAX_ENTRIES);
        assert_eq!(per_pid_entries(None), PID_MAX_DEFAULT);
        assert_eq!(per_pid_entries(Some(0)), 1);
        assert_eq!(activity_entries(4), 4);
        assert_eq!(activity_entries(PER_PID_MAX_ENTRIES), ACTIVITY_MAX);
    }

    #[test]
    fn the_watch_filters_cover_every_pid_below_pid_max() {
        // The highest pid, pid_max - 1, has its byte and its bit.
        assert_eq!(watch_filter_entries(Some(32768)), (4096, 512));
        assert_eq!(watch_filter_entries(Some(32769)), (4097, 513));
        assert_eq!(watch_filter_entries(Some(4_194_304)), (524_288, 65536));
        assert_eq!(watch_filter_entries(None), (4096, 512));
        assert_eq!(watch_filter_entries(Some(0)), (1, 1));
    }

    /// The start-up, modelled without a kernel: the lifecycle programs attach one after
    /// another in `order`, processes fork, exec and exit before, between and after the
    /// attaches (every combination), the scan runs once all are attached, and the tree is built
    /// as the pipeline builds it (the scan, then every event the attached programs saw, in
    /// order). Returns what the tree got wrong: dead processes it holds, live ones it lacks or
    /// shows with a stale argv.
    fn start_up_errors(order: [&str; LIFECYCLE_TRACEPOINTS.len()]) -> Vec<String> {
        use std::collections::BTreeMap;

        use crate::{
            events::{Argv, Event, ExitStatus, Identity},
            tree::{ProcessTree, Snapshot},
        };
        // Program i attaches at time 2i + 1, the scan runs after the last; events happen at
        // even times, so never at the same time as an attach or the scan.
        let attached_at =
            |program: &str| 2 * order.iter().position(|&p| p == program).unwrap() as u64 + 1;
        let scan_at = 2 * order.len() as u64 + 1;
        let times: Vec<u64> = (0..=scan_at + 1).step_by(2).collect();
        let init = Identity {
            pid: 1,
            start_ticks: 1,
        };
        let snapshot = |id: Identity, ppid: u32, argv: &str| Snapshot {
            id,
            ppid,
            uid: 0,
            comm: argv.rsplit('/').next().unwrap().into(),
            exe: argv.into(),
            argv: Argv::from_args(&[argv]),
            argv_truncated: false,
        };
        let mut scanned = vec![snapshot(init, 0, "/sbin/init")];
        let mut seen = Vec::new();
        // pid → the argv it must have in the end, for the processes still alive.
        let mut expected = BTreeMap::from([(1, "/sbin/init")]);
        let mut pid = 100;
        for &forked in &times {
            let execs = std::iter::once(None)
                .chain(times.iter().copied().filter(|&t| t > forked).map(Some));
            for exec in execs {
                let after = exec.unwrap_or(forked);
                let exits = std::iter::once(None)
                    .chain(times.iter().copied().filter(|&t| t > after).map(Some));
                for exit in exits {
                    pid += 1;
                    let id = Identity {
                        pid,
                        start_ticks: pid.into(),
                    };
                    let image = |at: u64| {
                        if exec.is_some_and(|e| e < at) {
                            "/bin/true"
                        } else {
                            "/sbin/init"
                        }
                    };
                    let mut events = vec![(
                        forked,
                        "sched_process_fork",
                        Event::Fork {
                            id,
                            time_ns: forked,
                            parent: init,
                            uid: 0,
                            comm: "init".into(),
                        },
                    )];
                    if let Some(t) = exec {
                        events.push((
                            t,
                            "sched_process_exec",
                            Event::Exec {
                                id,
                                time_ns: Some(t),
                                parent_pid: 1,
                                uid: 0,
                                comm: "true".into(),
                                filename: Some("/bin/true".into()),
                                argv: Argv::from_args(&["/bin/true"]),
                                argv_truncated: false,
                                filename_truncated: false,
                            },
                        ));
                    }
                    if let Some(t) = exit {
                        events.push((
                            t,
                            "sched_process_exit",
                            Event::Exit {
                                id,
                                time_ns: t,
                                status: ExitStatus(0),
                                reaper_pid: 1,
                            },
                        ));
                    }
                    seen.extend(
                        events
                            .into_iter()
                            .filter(|(t, program, _)| *t > attached_at(program)),
                    );
                    if forked < scan_at && exit.is_none_or(|t| t > scan_at) {
                        scanned.push(snapshot(id, 1, image(scan_at)));
                    }
                    if exit.is_none() {
                        expected.insert(pid, image(u64::MAX));
                    }
                }
            }
        }
        // The ring buffer's order is the order the events happened in.
        seen.sort_by_key(|(t, _, _)| *t);
        let mut tree = ProcessTree::from_scan(scanned);
        for (_, _, event) in &seen {
            tree.apply(event);
        }
        let mut errors = Vec::new();
        for p in tree.processes() {
            match expected.get(&p.id.pid) {
                None => errors.push(format!("{} is dead but in the tree", p.id)),
                Some(argv) if p.argv != Argv::from_args(&[argv]) => {
                    errors.push(format!("{} shows {:?}, not {argv}", p.id, p.argv))
                }
                Some(_) => {}
            }
        }
        for pid in expected.keys() {
            if tree.get(*pid).is_none() {
                errors.push(format!("{pid} is alive but missing"));
            }
        }
        errors
    }

    #[test]
    fn the_attach_order_leaves_nothing_for_a_reconcile_at_start_up() {
        assert_eq!(
            start_up_errors(lifecycle_attach_order()),
            Vec::<String>::new()
        );
        // The order before: the fork program first, the exit program third. A process that
        // forked after the first attach and exited before the third stayed in the tree.
        let errors = start_up_errors([
            "sched_process_fork",
            "sched_process_exec",
            "sched_process_exit",
            "task_rename",
        ]);
        assert!(
            errors
                .iter()
                .any(|e| e.ends_with("is dead but in the tree")),
            "{errors:?}"
        );
    }
}
