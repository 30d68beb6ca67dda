//! After the probes are loaded and attached and the sockets bound, the daemon keeps only the
//! capabilities its configuration needs ([`KEPT`], by [`Mode`]), in every set (effective,
//! permitted, inheritable, ambient, and bounding when it holds CAP_SETPCAP), and sets
//! no_new_privs. Loading and attaching needed more; running does not.
//!
//! Both are per thread: capset(2) changes the calling thread's credentials only, and
//! PR_SET_NO_NEW_PRIVS sets a bit of the calling task (`task_set_no_new_privs(current)` in
//! <https://github.com/torvalds/linux/blob/v6.18/kernel/sys.c>); a new thread starts with its
//! creator's (the credentials: copy_creds() in
//! <https://github.com/torvalds/linux/blob/v6.18/kernel/cred.c>; the flag: the task copy of
//! dup_task_struct() in <https://github.com/torvalds/linux/blob/v6.18/kernel/fork.c>).
//! So the drop must happen while the process has one thread, before any runtime starts:
//! [`drop_to_kept`] checks that, and says so if not.
//!
//! A dropped capability cannot come back (no_new_privs, and the permitted set is cut): a
//! SIGHUP whose configuration needs one is refused ([`reload_allowed`]), the running
//! configuration stays, and the error says to restart.
use caps::{CapSet, Capability, CapsHashSet};

use crate::config::{Config, Mode};

/// When the running daemon needs a capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum When {
    /// In every mode.
    Always,
    /// Only with `mode = "enforce"`: a dry run never signals.
    Enforcing,
}

impl When {
    pub(crate) fn applies(self, mode: Mode) -> bool {
        match self {
            Self::Always => true,
            Self::Enforcing => mode == Mode::Enforce,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Always => "every mode",
            Self::Enforcing => "mode = \"enforce\" only",
        }
    }
}

/// A capability the running daemon may keep: why, and in which modes.
#[derive(Clone, Copy, Debug)]
pub struct Kept {
    pub cap: Capability,
    pub(crate) when: When,
    pub why: &'static str,
}

/// Everything the running daemon may keep, and why: the one table the start-up log, `reaper
/// check` and the tests read. Checked on Linux 6.18 by reading another uid's entries with each
/// capability removed, and against the kernel's checks (all v6.18):
/// - `/proc/PID/fd` is `DIR("fd", S_IRUSR|S_IXUSR, …)` and `/proc/PID/io` is
///   `ONE("io", S_IRUSR, …)`, owned by the process's uid (`tgid_base_stuff` in
///   <https://github.com/torvalds/linux/blob/v6.18/fs/proc/base.c>): root without
///   CAP_DAC_OVERRIDE gets past those modes only with CAP_DAC_READ_SEARCH
///   (`generic_permission()` in <https://github.com/torvalds/linux/blob/v6.18/fs/namei.c>).
/// - The `exe` and `fd/N` links (`proc_pid_get_link()` / `proc_pid_readlink()` through
///   `proc_fd_access_allowed()`) and the `io` text (`do_io_accounting()`) need
///   `ptrace_may_access(PTRACE_MODE_READ_FSCREDS)`, `pidfd_getfd()` needs
///   `PTRACE_MODE_ATTACH_REALCREDS` (<https://github.com/torvalds/linux/blob/v6.18/kernel/pid.c>):
///   for another uid's process, CAP_SYS_PTRACE (`__ptrace_may_access()` in
///   <https://github.com/torvalds/linux/blob/v6.18/kernel/ptrace.c>).
/// - A signal to another uid's process needs CAP_KILL (`kill_ok_by_cred()` in
///   <https://github.com/torvalds/linux/blob/v6.18/kernel/signal.c>).
///
/// What a process's stdin and stdout are (`/proc/PID/fd/0`, `1`) decides which descendants go
/// with a target and what a leftover is, in a dry run as much as when enforcing, and `reaper
/// sessions` shows it: so CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE are needed in every mode and
/// for every activity source, not only for the `/proc/PID/io` fallback.
pub(crate) const KEPT: [Kept; 4] = [
    Kept {
        cap: Capability::CAP_BPF,
        when: When::Always,
        why: "update the watched-process map and read the loss counters (bpf() on existing maps)",
    },
    Kept {
        cap: Capability::CAP_KILL,
        when: When::Enforcing,
        why: "signal targets owned by other users through pidfds",
    },
    Kept {
        cap: Capability::CAP_SYS_PTRACE,
        when: When::Always,
        why: "other users' /proc/PID/exe (rules match the executable), /proc/PID/fd links (stdin and \
              stdout: sessions, leftovers) and /proc/PID/io; pidfd_getfd for close-input (and, in a \
              dry run, to report that first step)",
    },
    Kept {
        cap: Capability::CAP_DAC_READ_SEARCH,
        when: When::Always,
        why: "enter other users' /proc/PID/fd (mode 0500) and open their /proc/PID/io (mode 0400)",
    },
];

/// The rows of [`KEPT`] that `mode` needs.
pub fn kept(mode: Mode) -> impl Iterator<Item = &'static Kept> {
    KEPT.iter().filter(move |k| k.when.applies(mode))
}

/// The capabilities `config` needs while running.
pub(crate) fn needed(config: &Config) -> CapsHashSet {
    kept(config.mode).map(|k| k.cap).collect()
}

/// What the drop did.
#[derive(Clone, Debug, Default)]
pub struct Dropped {
    /// Still held.
    pub kept: CapsHashSet,
    /// Held before, given up: these cannot come back.
    pub dropped: CapsHashSet,
}

impl Dropped {
    /// `CAP_BPF (why), …` for the start-up log, in [`KEPT`]'s order.
    pub fn describe_kept(&self) -> String {
        KEPT.iter()
            .filter(|k| self.kept.contains(&k.cap))
            .map(|k| format!("{} ({})", k.cap, k.why))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The rows of [`KEPT`] given up because this mode does not need them.
    pub fn describe_given_up(&self) -> String {
        KEPT.iter()
            .filter(|k| self.dropped.contains(&k.cap))
            .map(|k| format!("{} (needed in {})", k.cap, k.when.as_str()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A new configuration needs a capability the daemon gave up at start-up.
#[derive(Debug, thiserror::Error)]
#[error(
    "the new configuration needs {caps}, dropped at start-up because the running mode did not \
     ({why}); restart reaper to apply it (systemctl restart reaper)"
)]
pub struct NeedsRestart {
    pub caps: String,
    why: String,
}

/// Whether a SIGHUP may apply `config` under what [`drop_to_kept`] left: refused when it needs a
/// capability that was dropped (a dry-run daemon reloaded to enforce needs CAP_KILL back). A
/// capability the daemon never had is not this check's business: start-up said so already.
pub fn reload_allowed(config: &Config, dropped: &Dropped) -> Result<(), NeedsRestart> {
    let missing: Vec<&Kept> = kept(config.mode)
        .filter(|k| dropped.dropped.contains(&k.cap))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(NeedsRestart {
        caps: missing
            .iter()
            .map(|k| k.cap.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        why: missing
            .iter()
            .map(|k| format!("{}: {}, {}", k.cap, k.when.as_str(), k.why))
            .collect::<Vec<_>>()
            .join("; "),
    })
}

#[derive(Debug, thiserror::Error)]
#[error("dropping capabilities failed ({what})")]
pub struct DropError {
    what: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Drops every capability but those `config` needs ([`needed`]) and sets no_new_privs, on the
/// calling thread, which must be the process's only one. Idempotent; an error leaves the
/// process running with more capabilities than needed (the caller logs it) but never fewer.
/// With other threads already running, this thread (and any it starts) is still reduced, and
/// the error says that the others are not.
pub fn drop_to_kept(config: &Config) -> Result<Dropped, DropError> {
    let threads = thread_count().map_err(|e| DropError {
        what: "counting this process's threads",
        source: Box::new(e),
    })?;
    let dropped = drop_on_this_thread(&needed(config))?;
    if threads > 1 {
        return Err(DropError {
            what: "other threads",
            source: format!(
                "{} other threads were running already and keep every capability",
                threads - 1
            )
            .into(),
        });
    }
    Ok(dropped)
}

/// The threads of this process now (`/proc/self/task`).
fn thread_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

fn drop_on_this_thread(keep: &CapsHashSet) -> Result<Dropped, DropError> {
    let err = |what| {
        move |e: caps::errors::CapsError| DropError {
            what,
            source: Box::new(e),
        }
    };
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
    rustix::thread::set_no_new_privs(true).map_err(|e| DropError {
        what: "no_new_privs",
        source: Box::new(e),
    })?;
    Ok(Dropped {
        kept,
        dropped: have.difference(keep).copied().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, parse};

    fn config(mode: &str) -> Config {
        parse(
            &format!("mode = \"{mode}\"\n[[rule]]\nname = \"r\"\ncomm = [\"c\"]\n"),
            "t",
            &Overrides::default(),
        )
        .unwrap()
    }

    fn set(caps: &[Capability]) -> CapsHashSet {
        caps.iter().copied().collect()
    }

    #[test]
    fn each_mode_keeps_what_it_uses() {
        use Capability::*;
        assert_eq!(
            needed(&config("enforce")),
            set(&[CAP_BPF, CAP_KILL, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH])
        );
        assert_eq!(
            needed(&config("dry-run")),
            set(&[CAP_BPF, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH])
        );
        // The /proc/PID/io fallback needs nothing more: the fd links need the same two.
        let proc_io = parse(
            "activity_source = \"proc-io\"\n[[rule]]\nname = \"r\"\ncomm = [\"c\"]\n",
            "t",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(needed(&proc_io), needed(&config("enforce")));
    }

    #[test]
    fn a_reload_that_needs_a_dropped_capability_is_refused_naming_it() {
        use Capability::*;
        // Started in dry-run as root: CAP_KILL (and the rest of root's set) given up.
        let dry = Dropped {
            kept: set(&[CAP_BPF, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH]),
            dropped: set(&[CAP_KILL, CAP_SYS_ADMIN, CAP_PERFMON]),
        };
        assert!(reload_allowed(&config("dry-run"), &dry).is_ok());
        let e = reload_allowed(&config("enforce"), &dry)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CAP_KILL") && e.contains("restart"), "{e}");
        assert!(
            !e.contains("CAP_SYS_ADMIN"),
            "only what the new mode needs: {e}"
        );
        // Started enforcing: any reload is fine.
        let enforcing = Dropped {
            kept: set(&[CAP_BPF, CAP_KILL, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH]),
            dropped: set(&[CAP_SYS_ADMIN]),
        };
        assert!(reload_allowed(&config("dry-run"), &enforcing).is_ok());
        assert!(reload_allowed(&config("enforce"), &enforcing).is_ok());
        // Never had CAP_KILL (a container without it): not a reason to refuse.
        let never = Dropped {
            kept: set(&[CAP_BPF]),
            dropped: CapsHashSet::new(),
        };
        assert!(reload_allowed(&config("enforce"), &never).is_ok());
        assert!(
            dry.describe_kept().starts_with("CAP_BPF ("),
            "{}",
            dry.describe_kept()
        );
        assert!(
            dry.describe_given_up()
                .contains("CAP_KILL (needed in mode = \"enforce\" only)")
        );
    }
}
