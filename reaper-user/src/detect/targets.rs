//! Who is a candidate: a process matches a rule by name, argv, terminal and parent. Pure.
use serde::Serialize;

use crate::{config::Rule, tree::Process};

/// Why a process is not a rule's target (shown by `reaper explain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Mismatch {
    Name {
        comm: String,
        exe: String,
        wanted: Vec<String>,
    },
    Argv {
        wanted_any: Vec<String>,
    },
    /// The rule wants argv and the process's was not read: the kernel sent its exec without
    /// it, and its `/proc/PID/cmdline` could not be read (the process is gone, or the read
    /// failed).
    ArgvUnknown,
    Tty {
        tty_nr: i32,
    },
    TtyUnknown,
    Parent {
        parent_comm: Option<String>,
        wanted: Vec<String>,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name { comm, exe, wanted } => write!(
                f,
                "name: comm {comm:?} and executable {:?} are not one of {}",
                basename(exe),
                wanted.join(", ")
            ),
            Self::Argv { wanted_any } => {
                write!(f, "argv: has none of {}", wanted_any.join(", "))
            }
            Self::ArgvUnknown => write!(
                f,
                "argv: not known (not sent at its exec, and /proc could not be read)"
            ),
            Self::Tty { tty_nr } => write!(f, "has a controlling terminal (tty_nr {tty_nr})"),
            Self::TtyUnknown => write!(f, "its terminal could not be read"),
            Self::Parent {
                parent_comm,
                wanted,
            } => write!(
                f,
                "parent {} is not one of {}",
                parent_comm
                    .as_deref()
                    .map_or("(unknown)".into(), crate::events::printable),
                wanted.join(", ")
            ),
        }
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The name part: `comm` or the executable's basename is one of the rule's names.
pub(crate) fn name_matches(rule: &Rule, p: &Process) -> bool {
    let exe = basename(&p.exe);
    rule.comm
        .iter()
        .any(|c| *c == p.comm || (!exe.is_empty() && c == exe))
}

/// Whether `rule`'s name part may match `p` once its image is read: it does
/// ([`name_matches`]), or the kernel did not read its image
/// ([`Argv::unknown`](crate::events::Argv::unknown), the exe
/// unknown too) and a name longer than a comm begins with its comm. The kernel sets the comm at
/// an exec to the exec'd file's basename cut to `TASK_COMM_LEN - 1` bytes; an exec'd name
/// within that is a match of the comm itself, and a rename since the exec hides the basename
/// from this test (the exec itself sent the image if a rule had the name then).
pub(crate) fn name_may_match(rule: &Rule, p: &Process) -> bool {
    const CUT: usize = reaper_common::COMM_LEN - 1;
    name_matches(rule, p)
        || (p.argv.is_unknown()
            && p.comm.len() == CUT
            && rule
                .comm
                .iter()
                .any(|c| c.len() > CUT && c.as_bytes().starts_with(p.comm.as_bytes())))
}

/// The argv part: one of the flags is present, `--flag=value` or `--flag value`. An unknown
/// argv has none.
pub(crate) fn argv_matches(rule: &Rule, p: &Process) -> bool {
    if rule.argv_any.is_empty() {
        return true;
    }
    let args: Vec<&[u8]> = p.argv.iter().collect();
    rule.argv_any.iter().any(|want| {
        let want = want.as_bytes();
        let split = want.iter().position(|b| *b == b'=');
        args.iter().enumerate().any(|(i, arg)| {
            *arg == want
                || split.is_some_and(|at| {
                    *arg == &want[..at]
                        && args.get(i + 1).is_some_and(|next| *next == &want[at + 1..])
                })
        })
    })
}

/// Checks every part of `rule` against `p`. The cheap checks come first; `tty_nr` (read from
/// `/proc` by the caller) is only consulted when name and argv already match.
pub fn matches(
    rule: &Rule,
    p: &Process,
    parent: Option<&Process>,
    tty_nr: impl FnOnce() -> Option<i32>,
) -> Result<(), Mismatch> {
    if !name_matches(rule, p) {
        return Err(Mismatch::Name {
            comm: p.comm.clone(),
            exe: p.exe.clone(),
            wanted: rule.comm.clone(),
        });
    }
    if !rule.argv_any.is_empty() && p.argv.is_unknown() {
        return Err(Mismatch::ArgvUnknown);
    }
    if !argv_matches(rule, p) {
        return Err(Mismatch::Argv {
            wanted_any: rule.argv_any.clone(),
        });
    }
    if !rule.parent_comm.is_empty() && !parent.is_some_and(|pp| rule.parent_comm.contains(&pp.comm))
    {
        return Err(Mismatch::Parent {
            parent_comm: parent.map(|pp| pp.comm.clone()),
            wanted: rule.parent_comm.clone(),
        });
    }
    if rule.require_no_tty {
        match tty_nr() {
            Some(0) => {}
            Some(tty_nr) => return Err(Mismatch::Tty { tty_nr }),
            None => return Err(Mismatch::TtyUnknown),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        events::{Argv, Identity},
    };

    fn process(comm: &str, exe: &str, argv: &[&str]) -> Process {
        Process {
            id: Identity {
                pid: 42,
                start_ticks: 7,
            },
            ppid: 41,
            uid: 1000,
            comm: comm.into(),
            exe: exe.into(),
            argv: Argv::from_args(argv),
            argv_truncated: false,
            children: Default::default(),
            exit: None,
            placeholder: false,
            inherited_image: false,
        }
    }

    const SDK_ARGV: &[&str] = &[
        "/usr/lib/node_modules/@anthropic-ai/claude-code/bin/claude",
        "--output-format",
        "stream-json",
        "--verbose",
        "--input-format",
        "stream-json",
        "--model=claude-sonnet-4-5",
        "--disallowedTools=Bash,Read",
        "--setting-sources=",
        "--permission-mode=default",
    ];

    fn rule() -> Rule {
        Config::builtin().rules.remove(0)
    }

    #[test]
    fn the_sdk_spawned_cli_is_a_target() {
        let p = process("claude", SDK_ARGV[0], SDK_ARGV);
        assert_eq!(matches(&rule(), &p, None, || Some(0)), Ok(()));
        // Through the package's claude.exe, and through a symlink named claude.
        let p = process("claude.exe", "/x/bin/claude.exe", SDK_ARGV);
        assert_eq!(matches(&rule(), &p, None, || Some(0)), Ok(()));
        let p = process("claude", "/x/bin/claude.exe", SDK_ARGV);
        assert_eq!(matches(&rule(), &p, None, || Some(0)), Ok(()));
    }

    #[test]
    fn both_flag_forms_match() {
        let spaced = process(
            "claude",
            "/b/claude",
            &["claude", "--input-format", "stream-json"],
        );
        let equals = process(
            "claude",
            "/b/claude",
            &["claude", "--output-format=stream-json"],
        );
        let other = process(
            "claude",
            "/b/claude",
            &["claude", "--output-format", "text"],
        );
        let dangling = process("claude", "/b/claude", &["claude", "--input-format"]);
        assert!(argv_matches(&rule(), &spaced));
        assert!(argv_matches(&rule(), &equals));
        assert!(!argv_matches(&rule(), &other));
        assert!(!argv_matches(&rule(), &dangling));
    }

    #[test]
    fn an_interactive_claude_in_a_terminal_is_not_a_target() {
        let p = process("claude", SDK_ARGV[0], SDK_ARGV);
        assert_eq!(
            matches(&rule(), &p, None, || Some(34816)),
            Err(Mismatch::Tty { tty_nr: 34816 })
        );
        assert_eq!(
            matches(&rule(), &p, None, || None),
            Err(Mismatch::TtyUnknown)
        );
        let interactive = process("claude", "/b/claude", &["claude"]);
        assert!(matches!(
            matches(&rule(), &interactive, None, || Some(0)),
            Err(Mismatch::Argv { .. })
        ));
    }

    #[test]
    fn lookalikes_are_not_targets() {
        for (comm, exe) in [
            ("claude-foo", "/b/claude-foo"),
            ("claudex", "/b/claudex"),
            ("node", "/usr/bin/node"),
        ] {
            let mut argv = SDK_ARGV.to_vec();
            argv[0] = exe;
            let p = process(comm, exe, &argv);
            assert!(
                matches!(
                    matches(&rule(), &p, None, || Some(0)),
                    Err(Mismatch::Name { .. })
                ),
                "{comm}"
            );
        }
        // node with "claude" all over its argv.
        let p = process(
            "node",
            "/usr/bin/node",
            &["node", "/opt/claude/cli.js", "--input-format=stream-json"],
        );
        assert!(matches(&rule(), &p, None, || Some(0)).is_err());
    }

    #[test]
    fn a_parent_constraint_is_checked() {
        let mut r = rule();
        r.parent_comm = vec!["node".into(), "bun".into()];
        let p = process("claude", SDK_ARGV[0], SDK_ARGV);
        let node = process("node", "/usr/bin/node", &["node", "server.js"]);
        let bash = process("bash", "/bin/bash", &["bash"]);
        assert_eq!(matches(&r, &p, Some(&node), || Some(0)), Ok(()));
        assert!(matches!(
            matches(&r, &p, Some(&bash), || Some(0)),
            Err(Mismatch::Parent { .. })
        ));
        assert!(matches!(
            matches(&r, &p, None, || Some(0)),
            Err(Mismatch::Parent { .. })
        ));
    }

    #[test]
    fn the_terminal_is_read_only_for_candidates() {
        let p = process("bash", "/bin/bash", &["bash"]);
        let mut asked = false;
        let _ = matches(&rule(), &p, None, || {
            asked = true;
            Some(0)
        });
        assert!(!asked);
    }
}
