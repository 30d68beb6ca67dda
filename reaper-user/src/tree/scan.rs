//! `/proc` → [`Snapshot`]s, through the `procfs` crate.
//!
//! Processes come and go while a scan runs: one that vanishes mid-read is skipped, never an
//! error. Zombies are left out: their exit has happened (and was reported by the kernel), only
//! their parent has not collected them yet. A zombie *leader* whose other threads still run is
//! a live process (its main thread called pthread_exit): `/proc/PID/stat` shows the leader's
//! state, so the threads in `/proc/PID/task` decide.
use procfs::process::{ProcState, Process as ProcProcess};
use reaper_common::ARGV_LEN;

use super::{Image, Snapshot};
use crate::events::{Argv, Identity};

/// Most threads a scan reads `/proc` with.
const SCAN_THREADS: usize = 4;

/// Every live process in `/proc`. The reads are the kernel's work (≈ 35 µs a process, most
/// of it generating `stat` and copying `cmdline` out of the process's memory), so they are
/// shared among up to [`SCAN_THREADS`] threads, one per CPU: with 10,000 processes the scan is
/// most of the daemon's start-up.
pub fn scan() -> std::io::Result<Vec<Snapshot>> {
    let pids: Vec<i32> = std::fs::read_dir("/proc")?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, SCAN_THREADS);
    let chunk = pids.len().div_ceil(threads).max(1);
    let read_all = |pids: &[i32]| -> Vec<Snapshot> {
        pids.iter()
            .filter_map(|&pid| ProcProcess::new(pid).ok().and_then(|p| read(&p)))
            .collect()
    };
    if threads == 1 || pids.len() <= chunk {
        return Ok(read_all(&pids));
    }
    Ok(std::thread::scope(|scope| {
        let parts: Vec<_> = pids
            .chunks(chunk)
            .map(|part| scope.spawn(move || read_all(part)))
            .collect();
        // A reader that panicked would have panicked the scan anyway: pass it on.
        parts
            .into_iter()
            .flat_map(|part| {
                part.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    }))
}

/// One process by pid, if it is alive (not a zombie).
pub fn read_pid(pid: u32) -> Option<Snapshot> {
    ProcProcess::new(i32::try_from(pid).ok()?)
        .ok()
        .and_then(|p| read(&p))
}

/// Whether the process with this identity is alive now.
pub fn alive(id: Identity) -> bool {
    let Ok(pid) = i32::try_from(id.pid) else {
        return false;
    };
    let Ok(stat) = ProcProcess::new(pid).and_then(|p| p.stat()) else {
        return false;
    };
    stat.starttime == id.start_ticks && !exited(pid, &stat)
}

/// Whether every thread of the process is gone (only the zombie leader is left).
fn exited(pid: i32, stat: &procfs::process::Stat) -> bool {
    if !matches!(stat.state(), Ok(ProcState::Zombie | ProcState::Dead)) {
        return false;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    !tasks.filter_map(Result::ok).any(|task| {
        let tid = task.file_name();
        tid.to_str() != Some(&pid.to_string())
            && std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|s| task_state(&s))
                .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

/// The state letter of a `/proc/PID/stat` or `/proc/PID/task/TID/stat` text: the first
/// character after the *last* `") "`. The comm before it is the task's own choice and may
/// hold `") Z"` itself; what the kernel prints after the comm has no parenthesis
/// (do_task_stat() in <https://github.com/torvalds/linux/blob/v6.18/fs/proc/array.c>).
pub fn task_state(stat: &str) -> Option<char> {
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

fn read(p: &ProcProcess) -> Option<Snapshot> {
    let stat = p.stat().ok()?;
    if exited(p.pid, &stat) {
        return None;
    }
    let uid = p.uid().ok()?;
    // Kernel threads have neither cmdline nor exe; both can also vanish mid-read.
    let Image {
        exe,
        argv,
        argv_truncated,
    } = read_image(p).unwrap_or_default();
    Some(Snapshot {
        id: Identity {
            pid: u32::try_from(stat.pid).ok()?,
            start_ticks: stat.starttime,
        },
        ppid: u32::try_from(stat.ppid).unwrap_or(0),
        uid,
        comm: stat.comm,
        exe,
        argv,
        argv_truncated,
    })
}

/// The image of the process whose `/proc/PID` directory `p` holds: `None` if its cmdline
/// cannot be read (it is gone), an empty `exe` if that link cannot (a kernel thread). Both are
/// read through that directory, not by pid: once its process is gone the directory no longer
/// revalidates and a read finds no task (-ESRCH), so a later holder of the pid is never read
/// (pid_revalidate(), proc_pid_cmdline_read(), proc_exe_link():
/// <https://github.com/torvalds/linux/blob/v6.18/fs/proc/base.c>).
pub(crate) fn read_image(p: &ProcProcess) -> Option<Image> {
    let file = p.open_relative("cmdline").ok()?;
    let (argv, argv_truncated) = read_cmdline_from(file).ok()?;
    let exe = p
        .exe()
        .map(|path| path.to_string_lossy().into_owned())
        .unwrap_or_default();
    Some(Image {
        exe,
        argv: Argv::new(argv),
        argv_truncated,
    })
}

/// The first [`ARGV_LEN`] bytes of `/proc/PID/cmdline`, and whether there was more: the same
/// bound, and the same flag, as the exec event's argv (reaper-ebpf cuts `mm->arg_end -
/// mm->arg_start` at `ARGV_LEN` and sets `EXEC_ARGV_TRUNCATED`). Any process can exec with
/// megabytes of arguments and fork many children that share them; read whole, every scan
/// would hold children × megabytes (measured: 100 such processes took the daemon from 18 MB
/// to 221 MB of RSS). Reads one byte past the bound to know whether there is more, never the
/// rest. `file` is a `/proc/PID/cmdline` the caller opened (through the directory whose stat
/// it read).
pub(crate) fn read_cmdline_from(file: std::fs::File) -> std::io::Result<(Vec<u8>, bool)> {
    read_bounded(file, ARGV_LEN)
}

/// At most `limit` bytes of `r`, and whether it had more.
fn read_bounded(r: impl std::io::Read, limit: usize) -> std::io::Result<(Vec<u8>, bool)> {
    use std::io::Read as _;
    let mut bytes = Vec::with_capacity(256);
    r.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    let truncated = bytes.len() > limit;
    bytes.truncate(limit);
    bytes.shrink_to_fit();
    Ok((bytes, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_cut_at_the_exec_events_bound_and_flagged() {
        let long = vec![b'a'; 3 * ARGV_LEN];
        assert_eq!(
            read_bounded(&long[..], ARGV_LEN).unwrap(),
            (long[..ARGV_LEN].to_vec(), true)
        );
        let exact = vec![b'b'; ARGV_LEN];
        assert_eq!(
            read_bounded(&exact[..], ARGV_LEN).unwrap(),
            (exact.clone(), false)
        );
        assert_eq!(
            read_bounded(&b"sleep\x009\0"[..], ARGV_LEN).unwrap(),
            (b"sleep\x009\0".to_vec(), false)
        );
        // This process's own, through /proc.
        let (own, truncated) =
            read_cmdline_from(std::fs::File::open("/proc/self/cmdline").unwrap()).unwrap();
        assert!(!own.is_empty() && own.len() <= ARGV_LEN);
        assert_eq!(
            truncated,
            std::fs::read("/proc/self/cmdline").unwrap().len() > ARGV_LEN
        );
    }
}
