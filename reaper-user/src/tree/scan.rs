//! `/proc` → [`Snapshot`]s, through the `procfs` crate.
//!
//! Processes come and go while a scan runs: one that vanishes mid-read is skipped, never an
//! error. Zombies are left out: their exit has happened (and was reported by the kernel), only
//! their parent has not collected them yet. A zombie *leader* whose other threads still run is
//! a live process (its main thread called pthread_exit): `/proc/PID/stat` shows the leader's
//! state, so the threads in `/proc/PID/task` decide.
use procfs::process::{Process as ProcProcess, ProcState};

use super::Snapshot;
use crate::events::{Argv, Identity};

/// Every live process in `/proc`.
pub fn scan() -> std::io::Result<Vec<Snapshot>> {
    let all = procfs::process::all_processes().map_err(std::io::Error::other)?;
    Ok(all.filter_map(Result::ok).filter_map(|p| read(&p)).collect())
}

/// One process by pid, if it is alive (not a zombie).
pub fn read_pid(pid: u32) -> Option<Snapshot> {
    ProcProcess::new(i32::try_from(pid).ok()?).ok().and_then(|p| read(&p))
}

/// Whether the process with this identity is alive now.
pub fn alive(id: Identity) -> bool {
    let Ok(pid) = i32::try_from(id.pid) else { return false };
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
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.chars().next()))
                .flatten()
                .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

fn read(p: &ProcProcess) -> Option<Snapshot> {
    let stat = p.stat().ok()?;
    if exited(p.pid, &stat) {
        return None;
    }
    let uid = p.uid().ok()?;
    // Kernel threads have neither cmdline nor exe; both can also vanish mid-read.
    let argv = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap_or_default();
    let exe = p
        .exe()
        .map(|path| path.to_string_lossy().into_owned())
        .unwrap_or_default();
    Some(Snapshot {
        id: Identity {
            pid: u32::try_from(stat.pid).ok()?,
            start_ticks: stat.starttime,
        },
        ppid: u32::try_from(stat.ppid).unwrap_or(0),
        uid,
        comm: stat.comm,
        exe,
        argv: Argv::new(argv),
    })
}
