//! The real host behind the pure cores' seams: `/proc` reads and the kernel's maps for the
//! detector ([`LiveHost`] implements [`detect::Host`]), pidfds for the reaper ([`Pidfds`]
//! implements [`reap::ProcessOps`]). The cores never import this module; `app` hands it in.
use std::{
    os::fd::{AsFd as _, OwnedFd},
    time::Duration,
};

use procfs::process::Process as ProcProcess;
use reaper_common::SockActivity;
use rustix::{
    net::{Shutdown, SocketType},
    process::{Pid, PidfdFlags, PidfdGetfdFlags, Signal},
};

use crate::{
    clock::{self, Nanos},
    detect::{self, Victim, session::Connections},
    events::Identity,
    probes::Probes,
    reap::{self, Input, OpenError},
    tree::{Image, scan},
};

fn proc_process(pid: u32) -> Option<ProcProcess> {
    ProcProcess::new(i32::try_from(pid).ok()?).ok()
}

/// Start time (clock ticks) from `/proc/PID/stat`.
pub fn proc_start_ticks(pid: u32) -> Option<u64> {
    Some(proc_process(pid)?.stat().ok()?.starttime)
}

/// What the detector reads: `/proc` for the targets, the kernel's maps through the probes. It
/// owns the probes, so its owner hands out `&mut host` (or `&host`) wherever the detector needs
/// the host, and the probes' own counters are `host.probes`.
pub(crate) struct LiveHost {
    pub probes: Probes,
}

impl detect::Host for LiveHost {
    fn now_ns(&self) -> Nanos {
        clock::mono_ns()
    }

    fn tty_nr(&self, pid: u32) -> Option<i32> {
        proc_process(pid)?.stat().ok().map(|s| s.tty_nr)
    }

    fn image(&self, id: Identity) -> Option<Image> {
        let p = proc_process(id.pid)?;
        if p.stat().ok()?.starttime != id.start_ticks {
            return None;
        }
        // Through the same `/proc/PID` directory as the stat just read (see read_image()).
        scan::read_image(&p)
    }

    fn cpu_ticks(&self, id: Identity) -> Option<u64> {
        let stat = proc_process(id.pid)?.stat().ok()?;
        (stat.starttime == id.start_ticks).then_some(stat.utime + stat.stime)
    }

    fn io_bytes(&self, id: Identity) -> Option<u64> {
        let p = proc_process(id.pid)?;
        if p.stat().ok()?.starttime != id.start_ticks {
            return None;
        }
        let io = p.io().ok()?;
        Some(io.rchar + io.wchar)
    }

    fn sock_activity(&self, target: u32) -> Option<SockActivity> {
        self.probes.sock_activity(target)
    }

    fn watch(&mut self, pid: u32, target: u32) -> bool {
        // A failure is logged and counted by the probes.
        self.probes.watch(pid, target).is_ok()
    }

    fn watch_incomplete(&self, target: u32) -> bool {
        self.probes.watch_failed(target)
    }

    fn unwatch(&mut self, target: u32, pids: &[u32]) {
        self.probes.unwatch(target, pids.iter().copied());
    }

    fn member_exited(&mut self, pid: u32) {
        self.probes.exited(pid);
    }

    fn watch_names(&mut self, names: &[&str]) {
        self.probes.set_watch_names(names.iter().copied());
    }

    fn connections(&self, pid: u32) -> Option<Connections> {
        let fd = |n: u32| {
            std::fs::read_link(format!("/proc/{pid}/fd/{n}"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
        };
        let stat = proc_process(pid)?.stat().ok()?;
        Some(Connections {
            stdin: fd(0),
            stdout: fd(1),
            session_leader: stat.session == stat.pid,
            uid: proc_process(pid)?.status().ok().map(|s| s.ruid),
        })
    }

    fn cgroup(&self, pid: u32) -> Option<String> {
        // A few hundred bytes; bounded all the same (a process cannot make it long).
        use std::io::Read as _;
        let mut text = String::new();
        std::fs::File::open(format!("/proc/{pid}/cgroup"))
            .ok()?
            .take(8192)
            .read_to_string(&mut text)
            .ok()?;
        Some(text)
    }

    fn rss_bytes(&self, id: Identity) -> Option<u64> {
        let p = proc_process(id.pid)?;
        if p.stat().ok()?.starttime != id.start_ticks {
            return None;
        }
        Some(p.statm().ok()?.resident * procfs::page_size())
    }
}

/// The real side effects of reaping: pidfds (`pidfd_open`, `pidfd_send_signal`,
/// `pidfd_getfd`, poll for exit).
#[derive(Clone, Copy, Debug, Default)]
pub struct Pidfds;

impl reap::ProcessOps for Pidfds {
    type Handle = OwnedFd;

    fn open(&self, v: &Victim) -> Result<OwnedFd, OpenError> {
        let pid = i32::try_from(v.id.pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or(OpenError::Gone)?;
        // No PIDFD_NONBLOCK: it needs 5.10, and only changes waitid(); exit is polled.
        let fd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).map_err(|e| {
            if e == rustix::io::Errno::SRCH {
                OpenError::Gone
            } else {
                OpenError::Io(e.into())
            }
        })?;
        // The pidfd names whoever held the pid when it was opened. If /proc still shows the
        // expected process now, that was ours; if it died since, signals through the pidfd
        // fail with ESRCH instead of reaching a newcomer. Expected means: the same start time
        // (not a reused pid), the same name (no exec into another program since the decision)
        // and the same real uid.
        let p = proc_process(v.id.pid).ok_or(OpenError::Gone)?;
        let stat = p.stat().map_err(|_| OpenError::Gone)?;
        let mismatch = |what: String| {
            Err(OpenError::Mismatch {
                pid: v.id.pid,
                what,
            })
        };
        if stat.starttime != v.id.start_ticks {
            return mismatch(format!(
                "start time {} ≠ {}",
                stat.starttime, v.id.start_ticks
            ));
        }
        // A zombie (ended, not yet collected by its parent) is gone already.
        if !scan::alive(v.id) {
            return Err(OpenError::Gone);
        }
        if stat.comm != v.comm {
            return mismatch(format!(
                "its name is now {:?}, not {:?}",
                crate::events::printable(&stat.comm),
                crate::events::printable(&v.comm)
            ));
        }
        let uid = p.status().map_err(|_| OpenError::Gone)?.ruid;
        if uid != v.uid {
            return mismatch(format!("it now runs as uid {uid}, not {}", v.uid));
        }
        Ok(fd)
    }

    fn signal(&self, handle: &OwnedFd, signal: i32) -> std::io::Result<bool> {
        let sig = Signal::from_named_raw(signal)
            .ok_or_else(|| std::io::Error::other(format!("bad signal {signal}")))?;
        match rustix::process::pidfd_send_signal(handle, sig) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::SRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn input(&self, handle: &OwnedFd) -> Input {
        // pidfd_getfd(2): kernel 5.6+, PTRACE_MODE_ATTACH_REALCREDS on the target
        // (<https://github.com/torvalds/linux/blob/v6.18/kernel/pid.c> `pidfd_getfd()`).
        match rustix::process::pidfd_getfd(handle, 0, PidfdGetfdFlags::empty()) {
            Ok(fd) => match rustix::net::sockopt::socket_type(&fd) {
                Ok(SocketType::STREAM) => Input::StreamSocket,
                _ => Input::Other,
            },
            Err(rustix::io::Errno::BADF) => Input::Other,
            Err(e) => Input::Unreachable(std::io::Error::from(e).to_string()),
        }
    }

    fn close_input(&self, handle: &OwnedFd) -> std::io::Result<()> {
        let fd = rustix::process::pidfd_getfd(handle, 0, PidfdGetfdFlags::empty())?;
        if rustix::net::sockopt::socket_type(&fd)? != SocketType::STREAM {
            return Err(std::io::Error::other(
                "its stdin is no longer a stream socket",
            ));
        }
        // SHUT_RD on an AF_UNIX stream socket: the owner's reads return 0 (EOF) from now on
        // (`unix_shutdown()`, <https://github.com/torvalds/linux/blob/v6.18/net/unix/af_unix.c>).
        // The peer's end (the agent daemon's) is left as it is.
        rustix::net::shutdown(&fd, Shutdown::Read)?;
        Ok(())
    }

    async fn wait_exit(&self, handle: &OwnedFd, timeout: Duration) -> bool {
        // A pidfd polls readable once the process has exited.
        let Ok(dup) = handle.as_fd().try_clone_to_owned() else {
            return false;
        };
        // SAFETY: the AsyncFd owns this duplicate fd for its whole life and closes it on drop.
        let Ok(fd) = (unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)
        }) else {
            return false;
        };
        matches!(
            tokio::time::timeout(timeout, fd.readable()).await,
            Ok(Ok(_))
        )
    }

    fn rss_bytes(&self, v: &Victim) -> Option<u64> {
        let statm = proc_process(v.id.pid)?.statm().ok()?;
        Some(statm.resident * procfs::page_size())
    }

    fn now_ns(&self) -> Nanos {
        clock::mono_ns()
    }
}
