//! The only aya-facing module: loads reaper's eBPF object, hands it the kernel layout, attaches
//! the BTF tracepoints and gives out the ring buffer and the loss counters.
//!
//! Attach types: BTF tracepoints (`tp_btf`) only. They need no tracefs, take typed
//! `task_struct *` arguments, and exist wherever kernel BTF does (5.5+); kprobes and fentry are
//! not assumed (many hosts, this one included, lack them).
pub mod layout;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use reaper_common::{EventKind, SockActivity};
pub use reaper_common::{LIFECYCLE_TRACEPOINTS, SOCKET_TRACEPOINTS};

/// The compiled eBPF object, built by build.rs from the `reaper-ebpf` crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reaper"));

/// Default ring buffer size, 4 MiB. Exec records carry only the argv present (≈ 400 bytes for
/// a typical exec, 4.4 KiB at most), so a process's fork+exec+exit+rename is ≈ 0.5 KiB: this
/// holds a backlog of ≈ 8,000 processes. A 10,000-process storm loses nothing even with 1 MiB
/// (measured); the consumer maps the data pages twice, so this costs 8 MiB of RSS.
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;

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
    Missing { what: &'static str, name: &'static str },
    #[error("loading or attaching program {program} to tracepoint {tracepoint} failed")]
    Attach {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
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
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            ring_bytes: DEFAULT_RING_BYTES,
            socket_activity: true,
        }
    }
}

/// Loaded and attached programs. Dropping this detaches them.
pub struct Probes {
    ebpf: Ebpf,
    lost: PerCpuArray<MapData, u64>,
    watched: HashMap<MapData, u32, u32>,
    activity: HashMap<MapData, u32, SockActivity>,
    socket_activity: bool,
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
        let offsets = layout::kernel_offsets(&btf)?;
        let socket_activity = options.socket_activity && layout::has_tracepoints(&btf, &SOCKET_TRACEPOINTS);
        drop(btf);
        tracing::debug!(?offsets, "kernel layout from BTF");

        // Wake the reader once an eighth of the ring is full; below that its timer collects.
        let wakeup_bytes = u64::from(bytes / 8);
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .map_max_entries("EVENTS", bytes)
            .load(EBPF_OBJECT)
            .map_err(ProbeError::Load)?;

        let btf = aya::Btf::from_sys_fs().map_err(ProbeError::Btf)?;
        let socket_programs: &[_] = if socket_activity { &SOCKET_TRACEPOINTS } else { &[] };
        // Each program is named after its tracepoint.
        for &program in LIFECYCLE_TRACEPOINTS.iter().chain(socket_programs) {
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

        let lost = ebpf.take_map("LOST").ok_or(ProbeError::Missing {
            what: "map",
            name: "LOST",
        })?;
        let lost = PerCpuArray::try_from(lost).map_err(|source| ProbeError::Map {
            name: "LOST",
            source,
        })?;
        let watched = take_map(&mut ebpf, "WATCHED")?;
        let activity = take_map(&mut ebpf, "ACTIVITY")?;
        drop(btf);
        // Parsing the kernel's BTF (twice: for the layout and for attaching) took ~25 MB that
        // is free now; glibc keeps freed memory in the process unless asked to return it.
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(Self {
            ebpf,
            lost,
            watched,
            activity,
            socket_activity,
        })
    }

    /// Whether socket activity is counted in the kernel (`sock:sock_{send,recv}_length`).
    pub fn socket_activity(&self) -> bool {
        self.socket_activity
    }

    /// Tracks `pid`'s activity (and, from now on, its new descendants') for `target`.
    pub fn watch(&mut self, pid: u32, target: u32) {
        if let Err(err) = self.watched.insert(pid, target, 0) {
            tracing::warn!(pid, target, %err, "could not watch a process for activity");
        }
    }

    /// Stops tracking a target: forgets its activity and unwatches `pids` (it and descendants).
    pub fn unwatch(&mut self, target: u32, pids: impl IntoIterator<Item = u32>) {
        let _ = self.activity.remove(&target);
        let _ = self.watched.remove(&target);
        for pid in pids {
            let _ = self.watched.remove(&pid);
        }
    }

    /// Socket bytes of `target` and its descendants so far, and when the last one moved.
    pub fn sock_activity(&self, target: u32) -> Option<SockActivity> {
        self.activity.get(&target, 0).ok()
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
        let mut counts = LostCounts::default();
        for kind in EventKind::ALL {
            let total = self
                .lost
                .get(&(kind as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            counts.set(kind, total);
        }
        counts
    }
}

/// Ring buffer reserve failures per event kind: events the kernel could not hand over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LostCounts([u64; EventKind::ALL.len()]);

impl LostCounts {
    pub fn get(&self, kind: EventKind) -> u64 {
        self.0[kind.index()]
    }

    fn set(&mut self, kind: EventKind, value: u64) {
        self.0[kind.index()] = value;
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

fn take_map<V: aya::Pod>(ebpf: &mut Ebpf, name: &'static str) -> Result<HashMap<MapData, u32, V>, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::Missing { what: "map", name })?;
    HashMap::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn page_size() -> u32 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| u32::try_from(size).ok())
        .unwrap_or(4096)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the memory cgroup.
/// Raising it needs CAP_SYS_RESOURCE, which a hardened service may not have: log, go on.
fn raise_memlock_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    if let Err(err) = setrlimit(
        Resource::RLIMIT_MEMLOCK,
        libc::RLIM_INFINITY,
        libc::RLIM_INFINITY,
    ) {
        tracing::debug!(%err, "could not raise RLIMIT_MEMLOCK (not needed on 5.11+)");
    }
}
