//! After the probes are loaded and attached and the sockets bound, the daemon keeps only the
//! capabilities it still needs, in every set (effective, permitted, inheritable, ambient, and
//! bounding when it holds CAP_SETPCAP), and sets no_new_privs. Loading and attaching needed more; running does not.
//!
//! Both are per thread: capset(2) changes the calling thread's credentials only, and
//! PR_SET_NO_NEW_PRIVS sets a bit of the calling task (`task_set_no_new_privs(current)` in
//! <https://github.com/torvalds/linux/blob/v6.18/kernel/sys.c>); a new thread starts with its
//! creator's (the credentials: copy_creds() in
//! <https://github.com/torvalds/linux/blob/v6.18/kernel/cred.c>; the flag: the task copy of
//! dup_task_struct() in <https://github.com/torvalds/linux/blob/v6.18/kernel/fork.c>).
//! So the drop must happen while the process has one thread, before any runtime starts:
//! [`drop_to_kept`] checks that, and says so if not.
use caps::{CapSet, Capability, CapsHashSet};

/// What the running daemon still needs, and why.
pub const KEPT: [(Capability, &str); 4] = [
    (
        Capability::CAP_BPF,
        "update the watched-process map and read the loss counters (bpf() on existing maps)",
    ),
    (Capability::CAP_KILL, "signal targets owned by other users through pidfds"),
    (
        Capability::CAP_SYS_PTRACE,
        "read other users' /proc/PID/exe and /proc/PID/io",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "read /proc entries whatever their file modes",
    ),
];

#[derive(Debug, thiserror::Error)]
#[error("dropping capabilities failed ({what})")]
pub struct DropError {
    what: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Drops every capability but [`KEPT`] and sets no_new_privs, on the calling thread, which must
/// be the process's only one. Idempotent; an error leaves the process running with more
/// capabilities than needed (the caller logs it) but never fewer than [`KEPT`]. With other
/// threads already running, this thread (and any it starts) is still reduced, and the error
/// says that the others are not.
pub fn drop_to_kept() -> Result<CapsHashSet, DropError> {
    let threads = thread_count().map_err(|e| DropError {
        what: "counting this process's threads",
        source: Box::new(e),
    })?;
    let kept = drop_on_this_thread()?;
    if threads > 1 {
        return Err(DropError {
            what: "other threads",
            source: format!("{} other threads were running already and keep every capability", threads - 1).into(),
        });
    }
    Ok(kept)
}

/// The threads of this process now (`/proc/self/task`).
fn thread_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

fn drop_on_this_thread() -> Result<CapsHashSet, DropError> {
    let keep: CapsHashSet = KEPT.iter().map(|(cap, _)| *cap).collect();
    let err = |what| move |e: caps::errors::CapsError| DropError { what, source: Box::new(e) };
    // The bounding set first: dropping from it needs CAP_SETPCAP, itself dropped below. A
    // supervisor that already bounded the set (systemd's CapabilityBoundingSet= leaves out
    // CAP_SETPCAP) chose it; what remains there cannot come back once the permitted set is
    // cut and no_new_privs is set, so it is left as given.
    let effective = caps::read(None, CapSet::Effective).map_err(err("read effective set"))?;
    if effective.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding).map_err(err("read bounding set"))? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(err("bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err("ambient set"))?;
    let have = caps::read(None, CapSet::Permitted).map_err(err("read permitted set"))?;
    let kept: CapsHashSet = keep.intersection(&have).copied().collect();
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(err("inheritable set"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(err("effective set"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err("permitted set"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| DropError {
        what: "no_new_privs",
        source: Box::new(e),
    })?;
    Ok(kept)
}
