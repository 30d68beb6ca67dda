//! Judges the [`Facts`]: one row per item, in a fixed order, each problem with its fix. Pure.
use super::{
    BtfFacts, CAP_BPF, CAP_DAC_READ_SEARCH, CAP_KILL, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE,
    CAP_SYS_RESOURCE, CAPABILITY_FIX, Call, CheckItem, CheckReport, Facts, ReapFacts, Status,
    parse_kernel_version,
};
use crate::probes::{
    DEFAULT_RING_BYTES, LAST_WORD_TRACEPOINTS, LIFECYCLE_TRACEPOINTS, SOCKET_TRACEPOINTS, layout,
};

fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Bytes as a short human string (`16 MiB`, `unlimited`).
pub(crate) fn human_bytes(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "unlimited".to_owned();
    }
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024 && value.is_multiple_of(1024) && unit < UNITS.len() - 1 {
        value /= 1024;
        unit += 1;
    }
    format!("{value} {}", UNITS[unit])
}

/// Judges the facts: one row per item, in a fixed order.
pub(crate) fn assess(facts: &Facts) -> CheckReport {
    let mut items = Vec::new();
    let version = facts
        .kernel_release
        .as_deref()
        .and_then(parse_kernel_version);

    // Who we are.
    items.push(CheckItem::new(
        "running as",
        Status::Info,
        if facts.euid == 0 {
            "root (uid 0)".to_owned()
        } else {
            format!("uid {} (not root: capabilities decide)", facts.euid)
        },
    ));

    // Capabilities.
    match facts.cap_eff {
        None => items.push(
            CheckItem::new(
                "capabilities",
                Status::Warn,
                "cannot read CapEff from /proc/self/status",
            )
            .fix(CAPABILITY_FIX),
        ),
        Some(caps) => items.extend(capability_items(caps)),
    }

    // Kernel.
    let kernel_detail = match (&facts.kernel_release, &facts.machine) {
        (Some(release), Some(machine)) => format!("Linux {release} {machine}"),
        (Some(release), None) => format!("Linux {release}"),
        _ => "uname failed".to_owned(),
    };
    items.push(CheckItem::new("kernel", Status::Info, kernel_detail));

    // Kernel BTF, the layout and tracepoints read from it.
    items.extend(btf_items(&facts.btf));

    // Ring buffer: BPF_MAP_TYPE_RINGBUF arrived in 5.8.
    items.push(match version {
        Some(v) if v >= (5, 8, 0) => {
            CheckItem::new("BPF ring buffer", Status::Ok, "kernel 5.8 or later")
        }
        Some((major, minor, _)) => CheckItem::new(
            "BPF ring buffer",
            Status::Missing,
            format!("kernel {major}.{minor} has none (5.8+)"),
        )
        .fix("upgrade to kernel 5.8 or later: reaper's events travel in a BPF ring buffer"),
        None => CheckItem::new(
            "BPF ring buffer",
            Status::Warn,
            "unknown: cannot read the kernel version",
        )
        .fix("reaper needs kernel 5.8 or later"),
    });

    // The kill path's system calls, tried on a child of the check.
    items.extend(reaping_items(&facts.reaping, facts.cap_eff));

    // RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps to it; later ones to the memory cgroup.
    items.push(memlock_item(facts, version));

    CheckReport { items }
}

fn capability_items(caps: u64) -> Vec<CheckItem> {
    let mut items = Vec::new();
    // bpf_capable() and perfmon_capable() both accept CAP_SYS_ADMIN in place of the new caps.
    let (bpf, perfmon, admin) = (
        has(caps, CAP_BPF),
        has(caps, CAP_PERFMON),
        has(caps, CAP_SYS_ADMIN),
    );
    let ebpf = match (bpf && perfmon, admin) {
        (true, _) => CheckItem::new("CAP_BPF + CAP_PERFMON", Status::Ok, "load and attach eBPF"),
        (false, true) => CheckItem::new(
            "CAP_BPF + CAP_PERFMON",
            Status::Ok,
            "CAP_SYS_ADMIN stands in for them (load and attach eBPF)",
        ),
        (false, false) => {
            let lacking: Vec<&str> = [(bpf, "CAP_BPF"), (perfmon, "CAP_PERFMON")]
                .into_iter()
                .filter(|(held, _)| !held)
                .map(|(_, name)| name)
                .collect();
            CheckItem::new(
                "CAP_BPF + CAP_PERFMON",
                Status::Missing,
                format!("no {}: cannot load eBPF programs", lacking.join(" or ")),
            )
            .fix(CAPABILITY_FIX)
        }
    };
    items.push(ebpf);
    items.push(if has(caps, CAP_KILL) {
        CheckItem::new("CAP_KILL", Status::Ok, "signal targets of any user")
    } else {
        CheckItem::new(
            "CAP_KILL",
            Status::Missing,
            "cannot signal other users' processes",
        )
        .fix(CAPABILITY_FIX)
    });
    items.push(if has(caps, CAP_SYS_PTRACE) {
        CheckItem::new(
            "CAP_SYS_PTRACE",
            Status::Ok,
            "read any user's /proc/PID/exe, fd links and io; pidfd_getfd",
        )
    } else {
        CheckItem::new(
            "CAP_SYS_PTRACE",
            Status::Missing,
            "cannot read other users' /proc/PID/exe, fd links and io, nor close their input",
        )
        .fix(CAPABILITY_FIX)
    });
    items.push(if has(caps, CAP_DAC_READ_SEARCH) {
        CheckItem::new(
            "CAP_DAC_READ_SEARCH",
            Status::Ok,
            "enter any user's /proc/PID/fd (0500), open /proc/PID/io (0400)",
        )
    } else {
        CheckItem::new(
            "CAP_DAC_READ_SEARCH",
            Status::Warn,
            "other users' /proc/PID/fd and io unreadable: stdin/stdout of sessions and the io fallback unknown",
        )
        .fix(CAPABILITY_FIX)
    });
    items
}

const SYSCALL_FIX: &str =
    "allow pidfd_open, pidfd_send_signal and pidfd_getfd (a seccomp filter or LSM denies them?)";

const RETRY_FIX: &str = "fix what stopped it (see the rows above), then run `reaper check` again";

/// The kill path: every signal goes through a pidfd opened non-blocking (so a reused pid is
/// never hit, and waiting for an exit never blocks); the ladder starts by closing a target's
/// input where it can, else with SIGINT.
fn reaping_items(r: &ReapFacts, cap_eff: Option<u64>) -> Vec<CheckItem> {
    let mut items = Vec::new();
    let open = "pidfd_open";
    items.push(match &r.pidfd_open {
        Call::Works => CheckItem::new(
            open,
            Status::Ok,
            "pidfd_open(PIDFD_NONBLOCK) works (kernel 5.10+)",
        ),
        Call::Fails {
            errno: libc::EINVAL,
            ..
        } => CheckItem::new(
            open,
            Status::Missing,
            "pidfd_open rejects PIDFD_NONBLOCK (kernel before 5.10): every kill would fail",
        )
        .fix("upgrade to kernel 5.10 or later"),
        Call::Fails {
            errno: libc::ENOSYS,
            ..
        } => CheckItem::new(
            open,
            Status::Missing,
            "pidfd_open is not implemented (kernel before 5.3)",
        )
        .fix("upgrade to kernel 5.10 or later: reaper signals through pidfds only"),
        Call::Fails { error, .. } => CheckItem::new(
            open,
            Status::Missing,
            format!("pidfd_open(PIDFD_NONBLOCK) on a child failed: {error}"),
        )
        .fix(SYSCALL_FIX),
        Call::NotTried(why) => {
            CheckItem::new(open, Status::Warn, format!("not tried: {why}")).fix(RETRY_FIX)
        }
    });

    let send = "pidfd_send_signal";
    items.push(match &r.pidfd_send_signal {
        Call::Works => CheckItem::new(
            send,
            Status::Ok,
            "signal 0 through a pidfd works (kernel 5.1+)",
        ),
        Call::Fails {
            errno: libc::ENOSYS,
            ..
        } => CheckItem::new(
            send,
            Status::Missing,
            "pidfd_send_signal is not implemented (kernel before 5.1)",
        )
        .fix("upgrade to kernel 5.10 or later: reaper signals through pidfds only"),
        Call::Fails { error, .. } => CheckItem::new(
            send,
            Status::Missing,
            format!("pidfd_send_signal(0) to a child failed: {error}"),
        )
        .fix(SYSCALL_FIX),
        Call::NotTried(why) => {
            CheckItem::new(send, Status::Warn, format!("not tried: {why}")).fix(RETRY_FIX)
        }
    });

    let getfd = "pidfd_getfd";
    let sigint_instead = "targets get SIGINT instead of a closed input";
    items.push(match &r.close_input {
        Call::Works => CheckItem::new(
            getfd,
            Status::Ok,
            "took a child's socket and ended its input (shutdown SHUT_RD): input can be closed (kernel 5.6+)",
        ),
        Call::Fails { errno: libc::ENOSYS, .. } => CheckItem::new(
            getfd,
            Status::Warn,
            format!("pidfd_getfd is not implemented (kernel before 5.6): {sigint_instead}"),
        )
        .fix("upgrade to kernel 5.6 or later for the clean first step"),
        Call::Fails { errno: libc::EPERM | libc::EACCES, error } => {
            let row = CheckItem::new(
                getfd,
                Status::Warn,
                format!("pidfd_getfd on this check's own child was refused ({error}): {sigint_instead}"),
            );
            if r.ptrace_scope == Some(3) {
                row.fix("kernel.yama.ptrace_scope is 3 (no ptrace access at all): set it to 1 or 2")
            } else {
                row.fix(SYSCALL_FIX)
            }
        }
        Call::Fails { error, .. } => CheckItem::new(
            getfd,
            Status::Warn,
            format!("closing a child's input failed: {error}: {sigint_instead}"),
        )
        .fix(SYSCALL_FIX),
        Call::NotTried(why) => {
            CheckItem::new(getfd, Status::Warn, format!("not tried: {why}")).fix(RETRY_FIX)
        }
    });

    // Which step the ladder starts with, for targets whose stdin is a stream socket (the
    // TypeScript SDK's); a pipe (the Python SDK's) always gets SIGINT. pidfd_getfd needs
    // ptrace access: CAP_SYS_PTRACE for another user's process
    // <https://github.com/gregkh/linux/blob/v6.1.172/kernel/pid.c#L675>, <https://github.com/gregkh/linux/blob/v6.1.172/kernel/ptrace.c#L340-L347>.
    let ladder = "kill ladder";
    let then = "then SIGTERM, SIGKILL";
    let can_signal = r.pidfd_open == Call::Works && r.pidfd_send_signal == Call::Works;
    let ptrace = cap_eff.is_some_and(|caps| has(caps, CAP_SYS_PTRACE));
    items.push(match (can_signal, &r.close_input, ptrace) {
        (false, _, _) => CheckItem::new(ladder, Status::Info, "none: reaper cannot signal here (see the pidfd rows)"),
        (true, Call::Works, true) => CheckItem::new(
            ladder,
            Status::Ok,
            format!("close input where stdin is a socket, else SIGINT; {then}"),
        ),
        (true, Call::Works, false) => CheckItem::new(
            ladder,
            Status::Warn,
            format!(
                "close input only for targets of this uid (no CAP_SYS_PTRACE), SIGINT for others; {then}"
            ),
        )
        .fix(CAPABILITY_FIX),
        (true, _, _) => CheckItem::new(ladder, Status::Warn, format!("SIGINT first (no pidfd_getfd); {then}"))
            .fix("see the pidfd_getfd row"),
    });
    items
}

const BTF_FIX: &str = "kernel built without CONFIG_DEBUG_INFO_BTF: reaper needs BTF \
                       (use a distribution kernel, or rebuild with CONFIG_DEBUG_INFO_BTF=y)";

fn btf_items(btf: &BtfFacts) -> Vec<CheckItem> {
    let mut items = Vec::new();
    let (offsets, tracepoints) = match btf {
        BtfFacts::Absent => {
            items.push(
                CheckItem::new(
                    "kernel BTF",
                    Status::Missing,
                    format!("{} does not exist", layout::VMLINUX_BTF),
                )
                .fix(BTF_FIX),
            );
            (None, None)
        }
        BtfFacts::Unreadable(err) => {
            items.push(
                CheckItem::new("kernel BTF", Status::Missing, err.clone())
                    .fix("make /sys/kernel/btf/vmlinux readable to reaper (sandbox hiding /sys?)"),
            );
            (None, None)
        }
        BtfFacts::Parsed {
            offsets,
            tracepoints,
        } => {
            items.push(CheckItem::new(
                "kernel BTF",
                Status::Ok,
                format!("{} parses", layout::VMLINUX_BTF),
            ));
            (Some(offsets), Some(tracepoints))
        }
    };

    items.push(match offsets {
        Some(Ok(())) => CheckItem::new(
            "kernel layout",
            Status::Ok,
            "every task_struct/signal_struct/mm_struct/pid offset resolved",
        ),
        Some(Err(err)) => CheckItem::new("kernel layout", Status::Missing, err.clone())
            .fix("this kernel's structs differ from what reaper reads: report it with `uname -r`"),
        None => CheckItem::new(
            "kernel layout",
            Status::Missing,
            "not checked: no kernel BTF",
        )
        .fix(BTF_FIX),
    });

    let arity = |name: &str| -> Option<Option<usize>> {
        tracepoints.map(|tps| tps.iter().find(|(n, _)| n == name).and_then(|(_, a)| *a))
    };
    for name in LIFECYCLE_TRACEPOINTS {
        let item = format!("tracepoint {name}");
        items.push(match arity(name) {
            Some(Some(args)) => CheckItem::new(item, Status::Ok, format!("in BTF ({args} args)")),
            Some(None) => CheckItem::new(item, Status::Missing, "not in this kernel's BTF")
                .fix("reaper needs this BTF tracepoint: use a kernel 5.8 or later with BTF"),
            None => {
                CheckItem::new(item, Status::Missing, "not checked: no kernel BTF").fix(BTF_FIX)
            }
        });
    }
    for name in SOCKET_TRACEPOINTS {
        let item = format!("tracepoint {name}");
        items.push(match arity(name) {
            Some(Some(args)) => CheckItem::new(
                item,
                Status::Ok,
                format!("in BTF ({args} args): socket activity counted in the kernel"),
            ),
            Some(None) => CheckItem::new(item, Status::Warn, "not in this kernel (6.3+)")
                .fix("none needed: activity falls back to /proc/PID/io"),
            None => CheckItem::new(item, Status::Warn, "not checked: no kernel BTF")
                .fix("none needed: activity falls back to /proc/PID/io"),
        });
    }
    // The model's last word (the target's last network receive), which decides whether a
    // child it started afterwards is a tool its turn waits on.
    let last_word = "model's last word";
    let present = |name: &str| arity(name).map(|args| args.is_some());
    items.push(match (present(SOCKET_TRACEPOINTS[1]), present(LAST_WORD_TRACEPOINTS[0])) {
        (Some(true), tcp) => CheckItem::new(
            last_word,
            Status::Ok,
            if tcp == Some(true) {
                "sock:sock_recv_length, stamped in the kernel (tcp:tcp_rcv_space_adjust with activity_source = \"proc-io\")"
            } else {
                "sock:sock_recv_length, stamped in the kernel"
            },
        ),
        (_, Some(true)) => CheckItem::new(
            last_word,
            Status::Ok,
            "tcp:tcp_rcv_space_adjust, stamped in the kernel (also when activity_source = \"proc-io\")",
        ),
        (Some(false), Some(false)) => CheckItem::new(
            last_word,
            Status::Warn,
            "sampled from /proc/PID/io: no sock:sock_recv_length or tcp:tcp_rcv_space_adjust",
        )
        .fix("none needed; a tool started in the same sample as the model's answer is taken for one the turn waits on"),
        _ => CheckItem::new(last_word, Status::Warn, "not checked: no kernel BTF").fix(BTF_FIX),
    });
    items
}

fn memlock_item(facts: &Facts, version: Option<(u32, u32, u32)>) -> CheckItem {
    let Some((soft, hard)) = facts.memlock else {
        return CheckItem::new("RLIMIT_MEMLOCK", Status::Info, "cannot read the limit");
    };
    let limit = if soft == hard {
        human_bytes(soft)
    } else {
        format!("{} (hard {})", human_bytes(soft), human_bytes(hard))
    };
    let memcg = version.is_some_and(|v| v >= (5, 11, 0));
    let can_raise = hard == u64::MAX
        || facts
            .cap_eff
            .is_some_and(|caps| has(caps, CAP_SYS_RESOURCE));
    // The ring buffer alone is DEFAULT_RING_BYTES; the other maps are small.
    let enough = soft == u64::MAX || soft >= u64::from(DEFAULT_RING_BYTES) * 2;
    if memcg {
        CheckItem::new(
            "RLIMIT_MEMLOCK",
            Status::Info,
            format!("{limit} (not used: kernel 5.11+ charges BPF maps to the memory cgroup)"),
        )
    } else if enough || can_raise {
        CheckItem::new(
            "RLIMIT_MEMLOCK",
            Status::Ok,
            format!("{limit} (reaper raises it to unlimited where it can)"),
        )
    } else {
        CheckItem::new(
            "RLIMIT_MEMLOCK",
            Status::Warn,
            format!("{limit}: too low for the BPF maps on a kernel before 5.11"),
        )
        .fix("raise it: LimitMEMLOCK=infinity in the unit, or grant CAP_SYS_RESOURCE")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[u32]) -> u64 {
        list.iter().fold(0, |acc, &cap| acc | (1u64 << cap))
    }

    const ALL_CAPS: u64 = (1u64 << 41) - 1;

    fn tracepoints(present: &[&str]) -> Vec<(String, Option<usize>)> {
        LIFECYCLE_TRACEPOINTS
            .iter()
            .chain(&SOCKET_TRACEPOINTS)
            .chain(&LAST_WORD_TRACEPOINTS)
            .map(|&n| (n.to_owned(), present.contains(&n).then_some(2)))
            .collect()
    }

    /// Every kill-path call works, no Yama.
    fn works() -> ReapFacts {
        ReapFacts {
            pidfd_open: Call::Works,
            pidfd_send_signal: Call::Works,
            close_input: Call::Works,
            ptrace_scope: None,
        }
    }

    fn fails(errno: i32) -> Call {
        Call::Fails {
            errno,
            error: std::io::Error::from_raw_os_error(errno).to_string(),
        }
    }

    /// A 6.18 host, root with every capability: everything fine.
    fn good() -> Facts {
        Facts {
            euid: 0,
            cap_eff: Some(ALL_CAPS),
            kernel_release: Some("6.18.44-fc-v657".into()),
            machine: Some("x86_64".into()),
            btf: BtfFacts::Parsed {
                offsets: Ok(()),
                tracepoints: tracepoints(&[
                    "sched_process_fork",
                    "sched_process_exec",
                    "sched_process_exit",
                    "task_rename",
                    "sock_send_length",
                    "sock_recv_length",
                ]),
            },
            reaping: works(),
            memlock: Some((8 << 20, 8 << 20)),
        }
    }

    fn status(report: &CheckReport, item: &str) -> Status {
        report
            .get(item)
            .unwrap_or_else(|| panic!("no row {item:?} in\n{report}"))
            .status
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(8 << 20), "8 MiB");
        assert_eq!(human_bytes(65536), "64 KiB");
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(u64::MAX), "unlimited");
    }

    #[test]
    fn a_good_host_can_run() {
        let report = assess(&good());
        assert!(report.can_run(), "{report}");
        assert_eq!(report.with_status(Status::Missing).count(), 0);
        assert_eq!(report.with_status(Status::Warn).count(), 0, "{report}");
        for item in [
            "kernel BTF",
            "kernel layout",
            "BPF ring buffer",
            "pidfd_open",
            "pidfd_send_signal",
            "pidfd_getfd",
            "kill ladder",
            "CAP_KILL",
        ] {
            assert_eq!(status(&report, item), Status::Ok, "{item}");
        }
        assert_eq!(status(&report, "RLIMIT_MEMLOCK"), Status::Info);
        let text = report.to_string();
        assert!(text.ends_with("\nreaper can run here.\n"), "{text}");
        assert!(text.contains("Linux 6.18.44-fc-v657 x86_64"), "{text}");
    }

    #[test]
    fn without_capabilities_the_fix_names_them() {
        let report = assess(&Facts {
            euid: 1000,
            cap_eff: Some(0),
            ..good()
        });
        assert!(!report.can_run());
        for item in ["CAP_BPF + CAP_PERFMON", "CAP_KILL", "CAP_SYS_PTRACE"] {
            let row = report.get(item).unwrap();
            assert_eq!(row.status, Status::Missing, "{item}");
            assert_eq!(row.fix, CAPABILITY_FIX);
        }
        assert_eq!(status(&report, "CAP_DAC_READ_SEARCH"), Status::Warn);
        assert!(
            report
                .get("CAP_BPF + CAP_PERFMON")
                .unwrap()
                .detail
                .contains("no CAP_BPF or CAP_PERFMON")
        );
        let text = report.to_string();
        assert!(text.contains("uid 1000"), "{text}");
        // CAP_DAC_READ_SEARCH, and the ladder (no CAP_SYS_PTRACE for others' input).
        assert_eq!(status(&report, "kill ladder"), Status::Warn);
        assert!(
            text.contains("cannot run here: 3 required item(s) missing (2 warnings)"),
            "{text}"
        );
    }

    #[test]
    fn cap_sys_admin_stands_in_for_bpf_and_perfmon() {
        let with = |list: &[u32]| {
            assess(&Facts {
                cap_eff: Some(caps(list)),
                ..good()
            })
        };
        let admin = with(&[CAP_SYS_ADMIN, CAP_KILL, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH]);
        assert!(admin.can_run(), "{admin}");
        assert!(
            admin
                .get("CAP_BPF + CAP_PERFMON")
                .unwrap()
                .detail
                .contains("CAP_SYS_ADMIN")
        );
        let only_bpf = with(&[CAP_BPF, CAP_KILL, CAP_SYS_PTRACE]);
        assert!(!only_bpf.can_run());
        let row = only_bpf.get("CAP_BPF + CAP_PERFMON").unwrap();
        assert_eq!(row.detail, "no CAP_PERFMON: cannot load eBPF programs");
        let exact = with(&[
            CAP_BPF,
            CAP_PERFMON,
            CAP_KILL,
            CAP_SYS_PTRACE,
            CAP_DAC_READ_SEARCH,
        ]);
        assert!(exact.can_run(), "{exact}");
        assert_eq!(exact.with_status(Status::Warn).count(), 0);
    }

    #[test]
    fn no_btf_is_missing_with_the_config_fix() {
        let report = assess(&Facts {
            btf: BtfFacts::Absent,
            ..good()
        });
        assert!(!report.can_run());
        let btf = report.get("kernel BTF").unwrap();
        assert_eq!(btf.status, Status::Missing);
        assert!(btf.fix.contains("CONFIG_DEBUG_INFO_BTF"), "{}", btf.fix);
        assert_eq!(status(&report, "kernel layout"), Status::Missing);
        assert_eq!(
            status(&report, "tracepoint sched_process_fork"),
            Status::Missing
        );
        assert_eq!(status(&report, "tracepoint sock_send_length"), Status::Warn);

        let unreadable = assess(&Facts {
            btf: BtfFacts::Unreadable("permission denied".into()),
            ..good()
        });
        assert!(!unreadable.can_run());
        assert_eq!(
            unreadable.get("kernel BTF").unwrap().detail,
            "permission denied"
        );
    }

    #[test]
    fn a_layout_error_is_missing() {
        let report = assess(&Facts {
            btf: BtfFacts::Parsed {
                offsets: Err("kernel BTF: struct task_struct has no member start_boottime".into()),
                tracepoints: tracepoints(&LIFECYCLE_TRACEPOINTS),
            },
            ..good()
        });
        assert!(!report.can_run());
        let row = report.get("kernel layout").unwrap();
        assert!(row.detail.contains("start_boottime"));
        assert!(!row.fix.is_empty());
    }

    #[test]
    fn socket_tracepoints_are_optional() {
        let report = assess(&Facts {
            btf: BtfFacts::Parsed {
                offsets: Ok(()),
                tracepoints: tracepoints(&LIFECYCLE_TRACEPOINTS),
            },
            ..good()
        });
        assert!(report.can_run(), "{report}");
        let row = report.get("model's last word").unwrap();
        assert_eq!(row.status, Status::Warn);
        assert!(
            row.detail.starts_with("sampled from /proc/PID/io"),
            "{}",
            row.detail
        );
        for name in SOCKET_TRACEPOINTS {
            let row = report.get(&format!("tracepoint {name}")).unwrap();
            assert_eq!(row.status, Status::Warn);
            assert!(
                row.fix.contains("activity falls back to /proc/PID/io"),
                "{}",
                row.fix
            );
        }
        assert!(report.to_string().ends_with("can run here (3 warnings).\n"));

        // 4.16 to 6.2 (Debian 11, 12): the last word stamped from tcp_rcv_space_adjust.
        let mut present = LIFECYCLE_TRACEPOINTS.to_vec();
        present.extend(LAST_WORD_TRACEPOINTS);
        let report = assess(&Facts {
            btf: BtfFacts::Parsed {
                offsets: Ok(()),
                tracepoints: tracepoints(&present),
            },
            ..good()
        });
        let row = report.get("model's last word").unwrap();
        assert_eq!(row.status, Status::Ok);
        assert!(
            row.detail.starts_with("tcp:tcp_rcv_space_adjust"),
            "{}",
            row.detail
        );
        assert!(report.to_string().ends_with("can run here (2 warnings).\n"));

        let no_exec = assess(&Facts {
            btf: BtfFacts::Parsed {
                offsets: Ok(()),
                tracepoints: tracepoints(&[
                    "sched_process_fork",
                    "sched_process_exit",
                    "task_rename",
                ]),
            },
            ..good()
        });
        assert!(!no_exec.can_run());
        assert_eq!(
            status(&no_exec, "tracepoint sched_process_exec"),
            Status::Missing
        );
    }

    #[test]
    fn old_kernels_lack_the_ring_buffer() {
        let report = assess(&Facts {
            kernel_release: Some("5.4.0-150-generic".into()),
            ..good()
        });
        assert_eq!(status(&report, "BPF ring buffer"), Status::Missing);
        assert!(report.get("BPF ring buffer").unwrap().fix.contains("5.8"));

        let report = assess(&Facts {
            kernel_release: None,
            machine: None,
            ..good()
        });
        assert_eq!(status(&report, "BPF ring buffer"), Status::Warn);
        assert_eq!(report.get("kernel").unwrap().detail, "uname failed");
    }

    /// 5.8 and 5.9 have pidfd_open but not PIDFD_NONBLOCK, which every kill uses.
    #[test]
    fn a_kernel_without_pidfd_nonblock_cannot_reap() {
        let report = assess(&Facts {
            kernel_release: Some("5.9.16".into()),
            reaping: ReapFacts {
                pidfd_open: fails(libc::EINVAL),
                ..works()
            },
            ..good()
        });
        assert!(!report.can_run(), "{report}");
        let row = report.get("pidfd_open").unwrap();
        assert_eq!(row.status, Status::Missing);
        assert!(row.detail.contains("before 5.10"), "{}", row.detail);
        assert!(row.fix.contains("5.10"), "{}", row.fix);
        assert_eq!(report.get("kill ladder").unwrap().status, Status::Info);

        let report = assess(&Facts {
            reaping: ReapFacts {
                pidfd_open: fails(libc::ENOSYS),
                pidfd_send_signal: Call::NotTried("no pidfd".into()),
                close_input: Call::NotTried("no pidfd".into()),
                ptrace_scope: None,
            },
            ..good()
        });
        assert!(
            report
                .get("pidfd_open")
                .unwrap()
                .detail
                .contains("before 5.3")
        );
        assert_eq!(status(&report, "pidfd_send_signal"), Status::Warn);

        let denied = assess(&Facts {
            reaping: ReapFacts {
                pidfd_send_signal: fails(libc::EPERM),
                ..works()
            },
            ..good()
        });
        let row = denied.get("pidfd_send_signal").unwrap();
        assert_eq!(row.status, Status::Missing);
        assert!(
            row.detail.contains("Operation not permitted"),
            "{}",
            row.detail
        );
        assert_eq!(row.fix, SYSCALL_FIX);
    }

    /// Before 5.6 (or where ptrace is forbidden) the ladder starts with SIGINT: reaper runs.
    #[test]
    fn without_pidfd_getfd_the_ladder_starts_with_sigint() {
        let old = assess(&Facts {
            kernel_release: Some("5.4.0".into()),
            reaping: ReapFacts {
                close_input: fails(libc::ENOSYS),
                ..works()
            },
            ..good()
        });
        let row = old.get("pidfd_getfd").unwrap();
        assert_eq!(row.status, Status::Warn);
        assert!(
            row.detail.contains("before 5.6") && row.detail.contains("SIGINT"),
            "{}",
            row.detail
        );
        let ladder = old.get("kill ladder").unwrap();
        assert_eq!(ladder.status, Status::Warn);
        assert!(
            ladder.detail.starts_with("SIGINT first"),
            "{}",
            ladder.detail
        );

        let yama = assess(&Facts {
            reaping: ReapFacts {
                close_input: fails(libc::EPERM),
                ptrace_scope: Some(3),
                ..works()
            },
            ..good()
        });
        assert!(yama.can_run(), "{yama}");
        assert!(
            yama.get("pidfd_getfd")
                .unwrap()
                .fix
                .contains("ptrace_scope is 3")
        );
        let seccomp = assess(&Facts {
            reaping: ReapFacts {
                close_input: fails(libc::EPERM),
                ptrace_scope: Some(1),
                ..works()
            },
            ..good()
        });
        assert_eq!(seccomp.get("pidfd_getfd").unwrap().fix, SYSCALL_FIX);
    }

    /// pidfd_getfd works on the check's own child, but other users' targets need
    /// CAP_SYS_PTRACE.
    #[test]
    fn without_cap_sys_ptrace_only_own_targets_have_their_input_closed() {
        let report = assess(&Facts {
            cap_eff: Some(ALL_CAPS & !(1 << CAP_SYS_PTRACE)),
            ..good()
        });
        let ladder = report.get("kill ladder").unwrap();
        assert_eq!(ladder.status, Status::Warn);
        assert!(
            ladder.detail.contains("no CAP_SYS_PTRACE"),
            "{}",
            ladder.detail
        );
        assert_eq!(ladder.fix, CAPABILITY_FIX);
        assert_eq!(status(&assess(&good()), "kill ladder"), Status::Ok);
    }

    #[test]
    fn memlock_matters_only_before_5_11() {
        let old = |memlock, cap_eff| {
            assess(&Facts {
                kernel_release: Some("5.10.0".into()),
                memlock: Some(memlock),
                cap_eff: Some(cap_eff),
                ..good()
            })
        };
        let no_resource = ALL_CAPS & !(1 << CAP_SYS_RESOURCE);
        let low = old((64 << 10, 64 << 10), no_resource);
        let row = low.get("RLIMIT_MEMLOCK").unwrap();
        assert_eq!(row.status, Status::Warn);
        assert!(row.detail.starts_with("64 KiB"), "{}", row.detail);
        assert!(row.fix.contains("LimitMEMLOCK=infinity"));
        assert!(low.can_run(), "a warning does not stop reaper");
        assert_eq!(
            status(&old((64 << 10, 64 << 10), ALL_CAPS), "RLIMIT_MEMLOCK"),
            Status::Ok
        );
        assert_eq!(
            status(&old((64 << 10, u64::MAX), no_resource), "RLIMIT_MEMLOCK"),
            Status::Ok
        );
        let unlimited = old((u64::MAX, u64::MAX), no_resource);
        assert_eq!(
            unlimited.get("RLIMIT_MEMLOCK").unwrap().detail,
            "unlimited (reaper raises it to unlimited where it can)"
        );
        let new = assess(&good());
        assert!(new.get("RLIMIT_MEMLOCK").unwrap().detail.contains("8 MiB"));
    }
}
