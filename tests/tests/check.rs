//! `reaper check` on this machine: as root on a kernel with BTF (what `cargo xtask test` needs
//! anyway) reaper can run, and every required item is `ok`. With capabilities taken away (by
//! `setpriv`, for the `reaper check` child) the report says what is missing and how to fix it,
//! and the command exits non-zero.
use std::process::{Command, Output, Stdio};

use reaper::check::{self, CheckReport, Status};
use reaper_tests::reaper_bin;

/// Items that must be `ok` for reaper to run (and are, on the kernels the tests run on).
const REQUIRED: [&str; 14] = [
    "CAP_BPF + CAP_PERFMON",
    "CAP_KILL",
    "CAP_SYS_PTRACE",
    "kernel BTF",
    "kernel layout",
    "tracepoint sched_process_fork",
    "tracepoint sched_process_exec",
    "tracepoint sched_process_exit",
    "tracepoint task_rename",
    "BPF ring buffer",
    "pidfd_open",
    "pidfd_send_signal",
    "pidfd_getfd",
    "kill ladder",
];

#[test]
fn this_host_can_run_reaper() {
    let report = check::inspect();
    println!("{report}");
    assert!(
        nix::unistd::geteuid().is_root(),
        "run the tests as root (cargo xtask test)"
    );
    assert!(report.can_run(), "reaper cannot run here:\n{report}");
    for item in REQUIRED {
        let row = report
            .get(item)
            .unwrap_or_else(|| panic!("no {item} row:\n{report}"));
        assert_eq!(row.status, Status::Ok, "{item}:\n{report}");
    }
    let text = report.to_string();
    assert!(text.contains("kernel BTF"), "{text}");
    assert!(text.contains("sock_send_length"), "{text}");
    assert!(text.contains("sock_recv_length"), "{text}");
    assert!(text.contains("\nreaper can run here"), "{text}");
    // This machine's kernel (6.18) has the socket tracepoints: no fallback, so no warning.
    if kernel_at_least(6, 3) {
        assert_eq!(
            report.get("tracepoint sock_send_length").map(|r| r.status),
            Some(Status::Ok),
            "{text}"
        );
    }
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    check::parse_kernel_version(&release).is_some_and(|(a, b, _)| (a, b) >= (major, minor))
}

/// Runs `reaper check` with exactly `caps` (setpriv's names: `bpf`, `kill`, ...) left.
fn check_with_capabilities(caps: &[&str]) -> Output {
    assert!(
        which("setpriv"),
        "setpriv (util-linux) is needed to drop capabilities"
    );
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set={set}"))
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"));
    cmd.arg(reaper_bin()).arg("check");
    cmd.stdin(Stdio::null())
        .output()
        .expect("run the check under setpriv")
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
}

fn output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn reaper_check_passes_as_root() {
    let out = Command::new(reaper_bin())
        .arg("check")
        .stdin(Stdio::null())
        .output()
        .expect("run reaper check");
    let text = output(&out);
    assert!(out.status.success(), "{}\n{text}", out.status);
    for needle in [
        "kernel BTF",
        "sock_send_length",
        "pidfd",
        "reaper can run here",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }
}

#[test]
fn the_services_capabilities_are_enough() {
    let out = check_with_capabilities(&["bpf", "perfmon", "kill", "sys_ptrace", "dac_read_search"]);
    let text = output(&out);
    assert!(out.status.success(), "{}\n{text}", out.status);
    assert!(text.contains("reaper can run here"), "{text}");
    assert!(!text.contains("CAP_SYS_ADMIN stands in"), "{text}");
}

#[test]
fn without_capabilities_the_report_names_the_fix() {
    let out = check_with_capabilities(&[]);
    let text = output(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status 1 when reaper cannot run:\n{text}"
    );
    assert!(text.contains("reaper cannot run here"), "{text}");
    assert!(text.contains(check::CAPABILITY_FIX), "{text}");
    for item in ["CAP_BPF + CAP_PERFMON", "CAP_KILL", "CAP_SYS_PTRACE"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(item))
            .unwrap_or_else(|| panic!("a {item} line in:\n{text}"));
        assert!(line.contains("missing"), "{line}");
    }

    // Only the kill capability taken away.
    let out = check_with_capabilities(&["bpf", "perfmon", "sys_ptrace", "dac_read_search"]);
    let text = output(&out);
    assert!(!out.status.success(), "{text}");
    let missing: Vec<&str> = text.lines().filter(|l| l.contains("  missing  ")).collect();
    assert_eq!(missing.len(), 1, "only CAP_KILL is missing:\n{text}");
    assert!(missing[0].starts_with("CAP_KILL"), "{text}");
}

/// The report is a table whose header names the columns, with one status word per row.
#[test]
fn the_report_is_a_table() {
    let report: CheckReport = check::inspect();
    let text = report.to_string();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    for column in ["ITEM", "STATUS", "DETAIL", "FIX"] {
        assert!(header.contains(column), "{header}");
    }
    let status_at = header.find("STATUS").unwrap();
    for (line, item) in lines.zip(&report.items) {
        assert!(line.starts_with(&item.item), "{line}");
        let status = line.get(status_at..).unwrap_or("");
        assert!(
            status.starts_with(item.status.as_str()),
            "status column of {line:?}"
        );
    }
}

/// `reaper check --config FILE` says which capabilities `reaper run` keeps with that file, and
/// why (one row per row of reaper::privileges::KEPT): a dry run keeps no CAP_KILL.
#[test]
fn the_report_says_which_capabilities_the_configs_mode_keeps() {
    let dir = reaper_tests::TempDir::new("check-kept");
    let rule = "[[rule]]\nname = \"r\"\ncomm = [\"never-matches\"]\n";
    for (mode, kill_kept) in [("enforce", true), ("dry-run", false)] {
        let config = dir.write(
            &format!("{mode}.toml"),
            &format!("mode = \"{mode}\"\n{rule}"),
        );
        let out = Command::new(reaper_bin())
            .args(["check", "--config", config.to_str().unwrap()])
            .output()
            .expect("run reaper check");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let row = |cap: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("keeps {cap} ")))
                .unwrap_or_else(|| panic!("{mode}: no `keeps {cap}` row:\n{text}"))
                .to_owned()
        };
        for cap in ["CAP_BPF", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"] {
            assert!(
                row(cap).contains("after start-up, in every mode"),
                "{mode}: {}",
                row(cap)
            );
        }
        assert_eq!(
            row("CAP_KILL").contains("after start-up"),
            kill_kept,
            "{mode}: {}",
            row("CAP_KILL")
        );
        assert_eq!(
            row("CAP_KILL").contains("no: dropped at start-up"),
            !kill_kept,
            "{mode}: {}",
            row("CAP_KILL")
        );
    }
}
