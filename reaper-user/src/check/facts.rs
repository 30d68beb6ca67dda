//! What is so, for [`super::assess`] to judge: this process's privileges, the kernel's BTF
//! (the struct layout and tracepoints reaper reads from it), the kernel's version and limits,
//! and what the kill path's system calls do when tried on a child this check forks. Gathering
//! never panics: whatever cannot be read or tried is recorded as such.
use std::{
    io::Read as _,
    net::Shutdown,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::net::UnixStream,
    },
};

use crate::probes::{LAST_WORD_TRACEPOINTS, LIFECYCLE_TRACEPOINTS, SOCKET_TRACEPOINTS, layout};

/// What the kernel's BTF told us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BtfFacts {
    /// `/sys/kernel/btf/vmlinux` does not exist.
    Absent,
    /// It exists but could not be read or parsed.
    Unreadable(String),
    Parsed {
        /// Every struct offset the eBPF programs need, or why not.
        offsets: Result<(), String>,
        /// Each tracepoint checked, with its argument count if BTF has its prototype.
        tracepoints: Vec<(String, Option<usize>)>,
    },
}

/// The raw facts [`super::assess`] judges. Gathered by [`Facts::gather`], or made up in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Facts {
    pub euid: u32,
    /// Effective capability bits (`CapEff` of `/proc/self/status`), if readable.
    pub cap_eff: Option<u64>,
    /// `uname -r`, and `uname -m`.
    pub kernel_release: Option<String>,
    pub machine: Option<String>,
    pub btf: BtfFacts,
    /// The kill path's system calls, tried on a child of this check.
    pub reaping: ReapFacts,
    /// `RLIMIT_MEMLOCK` (soft, hard) in bytes; `u64::MAX` for unlimited.
    pub memlock: Option<(u64, u64)>,
}

impl Facts {
    /// Reads this process's privileges and the running kernel's features, and tries the kill
    /// path's system calls on a child it forks. Never panics.
    pub(crate) fn gather() -> Self {
        let uname = rustix::system::uname();
        let text = |s: &std::ffi::CStr| s.to_string_lossy().into_owned();
        Self {
            euid: rustix::process::geteuid().as_raw(),
            cap_eff: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| parse_cap_eff(&s)),
            kernel_release: Some(text(uname.release())),
            machine: Some(text(uname.machine())),
            btf: gather_btf(),
            reaping: ReapFacts::gather(),
            memlock: {
                // `None`: unlimited.
                let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock);
                let bytes = |limit: Option<u64>| limit.unwrap_or(u64::MAX);
                Some((bytes(limit.current), bytes(limit.maximum)))
            },
        }
    }
}

/// What one system call did when tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Works,
    /// It failed: `errno` (`ENOSYS`: the kernel does not have the call; 0: it returned but did
    /// not do what it should), and the error as text.
    Fails {
        errno: i32,
        error: String,
    },
    /// Not tried, and why (something it needs failed first).
    NotTried(String),
}

impl Call {
    fn from_errno(err: rustix::io::Errno) -> Self {
        Call::Fails {
            errno: err.raw_os_error(),
            error: err.to_string(),
        }
    }

    fn from_io(err: &std::io::Error) -> Self {
        Call::Fails {
            errno: err.raw_os_error().unwrap_or(0),
            error: err.to_string(),
        }
    }
}

/// The kill path's system calls, tried on a child this check forks. The child holds one end
/// of a socket pair, as a `claude` child holds the socket pair the TypeScript SDK gives it for
/// stdin; it only waits to be killed.
///
/// Kernel lines relied on (v6.1.172, Debian bookworm's kernel, one of the test matrix's):
/// - `pidfd_open` refuses unknown flags with `EINVAL`
///   <https://github.com/gregkh/linux/blob/v6.1.172/kernel/pid.c#L629>; `PIDFD_NONBLOCK` is known since 5.10
///   <https://man7.org/linux/man-pages/man2/pidfd_open.2.html>.
/// - `pidfd_getfd` needs ptrace access (`PTRACE_MODE_ATTACH_REALCREDS`)
///   <https://github.com/gregkh/linux/blob/v6.1.172/kernel/pid.c#L675>, granted for a process with the caller's uids and gids or with
///   CAP_SYS_PTRACE <https://github.com/gregkh/linux/blob/v6.1.172/kernel/ptrace.c#L340-L347>; Yama's scope 3 refuses it to everyone
///   <https://github.com/gregkh/linux/blob/v6.1.172/security/yama/yama_lsm.c#L381-L383>.
/// - `shutdown(SHUT_RD)` marks the socket itself, not a descriptor, `RCV_SHUTDOWN`
///   <https://github.com/gregkh/linux/blob/v6.1.172/net/unix/af_unix.c#L3057>, so a read through any descriptor of it returns end of
///   input <https://github.com/gregkh/linux/blob/v6.1.172/net/unix/af_unix.c#L2831-L2832>.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReapFacts {
    /// `pidfd_open(child, PIDFD_NONBLOCK)`: how reaping opens every target. `PIDFD_NONBLOCK`
    /// arrived in 5.10 (`EINVAL` before), `pidfd_open` in 5.3 (`ENOSYS` before).
    pub pidfd_open: Call,
    /// `pidfd_send_signal(pidfd, 0)` (5.1+): permission to signal, sending nothing. Tried on a
    /// pidfd opened without the flag where the flag was refused.
    pub pidfd_send_signal: Call,
    /// The kill ladder's first step, "close input": `pidfd_getfd` (5.6+; ptrace access to the
    /// target, so CAP_SYS_PTRACE for other users' processes) copies the child's socket, and
    /// `shutdown(SHUT_RD)` on the copy must end the child's input (checked by reading it).
    pub close_input: Call,
    /// `kernel.yama.ptrace_scope` (`None`: no Yama); 3 forbids `pidfd_getfd` to everyone.
    pub ptrace_scope: Option<u32>,
}

impl ReapFacts {
    /// Forks a child and tries the calls on it; kills and reaps the child before returning.
    pub fn gather() -> Self {
        let ptrace_scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let untried = |why: String| ReapFacts {
            pidfd_open: Call::NotTried(why.clone()),
            pidfd_send_signal: Call::NotTried(why.clone()),
            close_input: Call::NotTried(why),
            ptrace_scope,
        };
        // `ours` stays open throughout: the end of input seen below is the shutdown's doing,
        // not a closed peer.
        let (ours, theirs) = match UnixStream::pair() {
            Ok(pair) => pair,
            Err(err) => return untried(format!("socketpair failed: {err}")),
        };
        let child = match Sleeper::fork() {
            Ok(child) => child,
            Err(err) => return untried(format!("fork failed: {err}")),
        };
        let pid = child.0;
        use rustix::process::{PidfdFlags, pidfd_open};
        let (pidfd_open, pidfd) = match pidfd_open(pid, PidfdFlags::NONBLOCK) {
            Ok(fd) => (Call::Works, Ok(fd)),
            // Without the flag, so the other calls are still checked.
            Err(err) => (Call::from_errno(err), pidfd_open(pid, PidfdFlags::empty())),
        };
        let facts = match pidfd {
            Ok(pidfd) => ReapFacts {
                pidfd_open,
                pidfd_send_signal: send_signal_0(&pidfd),
                close_input: close_input(&pidfd, &theirs),
                ptrace_scope,
            },
            Err(err) => ReapFacts {
                pidfd_open,
                ..untried(format!("no pidfd: pidfd_open failed: {err}"))
            },
        };
        drop((child, ours));
        facts
    }
}

/// `pidfd_send_signal(pidfd, 0, NULL, 0)`. rustix's `Signal` cannot be 0, so the raw call.
fn send_signal_0(pidfd: &OwnedFd) -> Call {
    // SAFETY: a system call with an fd we own, signal 0, no siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Call::Works
    } else {
        Call::from_io(&std::io::Error::last_os_error())
    }
}

/// The kill ladder's "close input" on the child's socket: copy it with `pidfd_getfd`,
/// `shutdown(SHUT_RD)` the copy, then read our own handle on the same socket, which must see
/// end of input at once although its peer is still open.
fn close_input(pidfd: &OwnedFd, theirs: &UnixStream) -> Call {
    use rustix::process::{PidfdGetfdFlags, pidfd_getfd};
    // The child inherited `theirs` at the same descriptor number.
    let copy = match pidfd_getfd(pidfd, theirs.as_raw_fd(), PidfdGetfdFlags::empty()) {
        Ok(fd) => UnixStream::from(fd),
        Err(err) => return Call::from_errno(err),
    };
    if let Err(err) = copy.shutdown(Shutdown::Read) {
        return Call::from_io(&err);
    }
    if let Err(err) = theirs.set_nonblocking(true) {
        return Call::from_io(&err);
    }
    let mut byte = [0u8; 1];
    match (&*theirs).read(&mut byte) {
        Ok(0) => Call::Works,
        Ok(_) => Call::Fails {
            errno: 0,
            error: "read data nobody wrote".to_owned(),
        },
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Call::Fails {
            errno: 0,
            error: "shutdown(SHUT_RD) on the copy did not end the child's input".to_owned(),
        },
        Err(err) => Call::from_io(&err),
    }
}

/// A forked child that waits to be killed; killed and reaped on drop.
struct Sleeper(rustix::process::Pid);

impl Sleeper {
    /// rustix has no `fork` (only an unsafe runtime-level one), hence libc's.
    fn fork() -> std::io::Result<Self> {
        let parent = rustix::process::getpid().as_raw_pid();
        // SAFETY: the child calls only async-signal-safe functions (prctl, getppid, pause,
        // _exit: plain system calls), as a child of a multi-threaded process must.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                // SAFETY: plain system calls; the child dies with its parent and never returns.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() != parent {
                        libc::_exit(0);
                    }
                    loop {
                        libc::pause();
                    }
                }
            }
            // The parent: the child's pid (positive).
            child => rustix::process::Pid::from_raw(child)
                .map(Sleeper)
                .ok_or_else(|| std::io::Error::other(format!("fork returned {child}"))),
        }
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        // Our own unreaped child: its pid cannot have been reused.
        use rustix::process::{Signal, WaitOptions, kill_process, waitpid};
        let _ = kill_process(self.0, Signal::KILL);
        let _ = waitpid(Some(self.0), WaitOptions::empty());
    }
}

fn gather_btf() -> BtfFacts {
    if !std::path::Path::new(layout::VMLINUX_BTF).exists() {
        return BtfFacts::Absent;
    }
    let btf = match layout::vmlinux() {
        Ok(btf) => btf,
        Err(err) => return BtfFacts::Unreadable(error_chain(&err)),
    };
    let offsets = layout::kernel_layout(&btf)
        .map(drop)
        .map_err(|err| error_chain(&err));
    let tracepoints = LIFECYCLE_TRACEPOINTS
        .iter()
        .chain(&SOCKET_TRACEPOINTS)
        .chain(&LAST_WORD_TRACEPOINTS)
        .map(|&name| (name.to_owned(), layout::tracepoint_arity(&btf, name).ok()))
        .collect();
    BtfFacts::Parsed {
        offsets,
        tracepoints,
    }
}

/// An error and its sources, on one line.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The `CapEff:` bits of a `/proc/PID/status` text.
pub(crate) fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// `(major, minor, patch)` from a kernel release such as `6.18.44-fc-v657` or `5.15.0-91-generic`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32, u32)> {
    let mut parts = release.trim().splitn(3, '.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\treaper\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000000c000080024\nCapBnd:\t000001ffffffffff\n";
        let eff = parse_cap_eff(status).unwrap();
        assert_eq!(
            eff,
            [2u32, 5, 19, 38, 39]
                .iter()
                .fold(0, |acc, cap| acc | (1u64 << cap))
        );
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tnot-hex\n"), None);
        assert_eq!(parse_cap_eff(""), None);
    }

    #[test]
    fn parses_kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v657"), Some((6, 18, 44)));
        assert_eq!(parse_kernel_version("5.15.0-91-generic"), Some((5, 15, 0)));
        assert_eq!(parse_kernel_version("5.8"), Some((5, 8, 0)));
        assert_eq!(parse_kernel_version("6.1.0+"), Some((6, 1, 0)));
        assert_eq!(parse_kernel_version("4.19.0-rc1"), Some((4, 19, 0)));
        assert_eq!(parse_kernel_version("6.6-rc3"), Some((6, 6, 0)));
        assert_eq!(parse_kernel_version("6"), None);
        assert_eq!(parse_kernel_version(""), None);
        assert_eq!(parse_kernel_version("linux"), None);
    }

    #[test]
    fn error_chains_are_one_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&err), "outer: inner");
    }

    /// Live children of this process (every thread's), from /proc.
    fn children() -> Vec<String> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .flatten()
        {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                out.extend(list.split_whitespace().map(str::to_owned));
            }
        }
        out
    }

    /// This host's kernel (6.18, or any 5.10+) has every call the kill path makes, and the
    /// child the check forks is gone afterwards.
    #[test]
    fn the_kill_path_works_on_this_host_and_leaves_no_child() {
        let before = children();
        let r = ReapFacts::gather();
        assert_eq!(r.pidfd_open, Call::Works);
        assert_eq!(r.pidfd_send_signal, Call::Works);
        assert_eq!(r.close_input, Call::Works);
        assert_eq!(
            children(),
            before,
            "the check's child was killed and reaped"
        );
    }
}
