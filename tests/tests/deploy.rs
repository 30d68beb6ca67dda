//! The files in `deploy/`, checked with the tools that consume them: `systemd-analyze` for the
//! unit, `promtool` for the alerting rules and the dashboard's queries, reaper's own parser for
//! the example configuration, a YAML parser for the DaemonSet. The tools are Debian packages,
//! installed on first use (so a new machine passes); each check is also shown to reject a
//! deliberately broken copy, so it can fail.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use reaper::config::{Config, Mode, Overrides, parse};
use reaper_tests::{DEADLINE, TempDir, ensure_tool, free_port, reaper_bin, yaml_documents};
use serde_json::Value;

/// The metric names reaper exports (fixed: dashboards and alerts depend on them).
const METRICS: [&str; 12] = [
    "reaper_events_total",
    "reaper_events_lost_total",
    "reaper_decode_errors_total",
    "reaper_processes",
    "reaper_targets",
    "reaper_kills_total",
    "reaper_kill_failures_total",
    "reaper_would_kill_total",
    "reaper_reclaimed_bytes_total",
    "reaper_reconcile_corrections_total",
    "reaper_kill_delay_seconds",
    "reaper_build_info",
];

/// Also exported (the alerts read the mode), not shown on the dashboard.
const SERVICE_METRICS: [&str; 3] = [
    "reaper_mode",
    "reaper_config_last_reload_successful",
    "reaper_config_last_reload_success_timestamp_seconds",
];

/// The histogram among them, whose series carry these suffixes.
const HISTOGRAM: &str = "reaper_kill_delay_seconds";
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// The capabilities reaper needs (see `reaper::check`), as systemd names them.
const CAPABILITIES: [&str; 5] = [
    "cap_bpf",
    "cap_perfmon",
    "cap_kill",
    "cap_sys_ptrace",
    "cap_dac_read_search",
];

/// Every system call `reaper run` was seen making under strace (start-up, /proc scans,
/// serving /metrics and the local socket, shutdown), plus the kill path's pidfd calls.
/// The unit's SystemCallFilter must allow them all.
const SYSCALLS: &[&str] = &[
    "accept4",
    "access",
    "bind",
    "bpf",
    "brk",
    // Dropping capabilities once attached (reaper::privileges); systemd files it under
    // @privileged, so the unit allows it by name. Found missing by vm-test's systemd machine.
    "capget",
    "capset",
    "clock_gettime",
    "clock_nanosleep",
    "clone3",
    "close",
    "connect",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "eventfd2",
    "exit",
    "exit_group",
    "fcntl",
    "fstat",
    "fstatfs",
    "futex",
    "getdents64",
    "getrandom",
    "getresuid",
    "gettid",
    "listen",
    "lseek",
    "madvise",
    "mkdir",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "nanosleep",
    "newfstatat",
    "openat",
    "pidfd_open",
    "pidfd_send_signal",
    "poll",
    "ppoll",
    "pread64",
    "prlimit64",
    "read",
    "readlinkat",
    "recvfrom",
    "rseq",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_getaffinity",
    "sched_yield",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_tid_address",
    "setsockopt",
    "shutdown",
    "sigaltstack",
    "socket",
    "socketpair",
    "statx",
    "uname",
    "unlink",
    "write",
    "writev",
];

// ---------------------------------------------------------------------------------------------
// Set-up: files, temporary directories, tools.

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// The systemd unit.

/// `KEY=VALUE` settings of a unit file, in order (comments and section headers left out).
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn unit_setting(unit: &str, key: &str) -> Vec<String> {
    unit_settings(unit)
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

/// The unit as installed, with ExecStart pointing at the binary `cargo xtask test` built
/// (`systemd-analyze verify` insists that the program exists).
fn unit_for_verify() -> String {
    let bin = reaper_bin();
    let bin = bin.to_str().expect("a UTF-8 path to the reaper binary");
    assert!(
        !bin.contains(char::is_whitespace),
        "{bin}: a path with spaces"
    );
    let unit = read(&deploy("reaper.service"));
    assert_eq!(
        unit_setting(&unit, "ExecStart"),
        ["/usr/local/bin/reaper run --config /etc/reaper/reaper.toml"]
    );
    assert_eq!(
        unit_setting(&unit, "ExecStartPre"),
        ["/usr/local/bin/reaper check"]
    );
    unit.replace("=/usr/local/bin/reaper ", &format!("={bin} "))
}

/// Runs the reaper binary with `args` and `--help` last: clap parses every argument before it,
/// so a misspelled flag or a bad value fails.
fn reaper_accepts(args: &[&str]) -> Result<(), String> {
    let out = run(Command::new(reaper_bin()).args(args).arg("--help"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("reaper rejects {args:?}:\n{}", text(&out)))
    }
}

/// Verifies a unit the way systemd loads it, and checks what it loaded against what reaper
/// needs. `systemd-analyze verify` only warns (exit 0) about unknown keys and unparsable
/// values, and drops unknown capability names without a word, so: any message about the unit
/// is an error, and the parsed settings (its debug dump) are compared with the expectations.
fn check_unit(unit: &str) -> Result<(), String> {
    let dir = TempDir::new("unit");
    let path = dir.write("reaper.service", unit);
    let verify = |debug: bool| {
        let mut cmd = Command::new("systemd-analyze");
        cmd.args(["verify", "--man=no", "--generators=no"])
            .arg(&path);
        if debug {
            cmd.env("SYSTEMD_LOG_LEVEL", "debug");
        }
        run(&mut cmd)
    };
    let out = verify(false);
    let messages: Vec<String> = text(&out)
        .lines()
        .filter(|l| l.contains("reaper.service"))
        .map(str::to_owned)
        .collect();
    if !out.status.success() || !messages.is_empty() {
        return Err(format!(
            "systemd-analyze verify ({}):\n{}",
            out.status,
            if messages.is_empty() {
                text(&out)
            } else {
                messages.join("\n")
            }
        ));
    }

    // With debug logging, verify dumps the loaded unit on stdout: `\t\tKey: value` lines.
    let out = verify(true);
    let dump = String::from_utf8_lossy(&out.stdout);
    let mut loaded: BTreeMap<&str, String> = BTreeMap::new();
    for line in dump.lines() {
        if let Some((key, value)) = line.trim_start_matches('\t').split_once(": ") {
            loaded.entry(key).or_insert_with(|| value.trim().to_owned());
        }
    }
    if !loaded.contains_key("CapabilityBoundingSet") {
        return Err(format!(
            "no unit dump from systemd-analyze:\n{}",
            text(&out)
        ));
    }
    let mut problems = Vec::new();
    let set = |value: &str| {
        value
            .split_whitespace()
            .map(str::to_owned)
            .collect::<BTreeSet<_>>()
    };
    let wanted: BTreeSet<String> = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let got = set(loaded.get(key).map_or("", String::as_str));
        if got != wanted {
            problems.push(format!(
                "{key}: loaded {got:?}, reaper needs exactly {wanted:?}"
            ));
        }
        // systemd skips names it does not know: compare what is written too.
        let written = set(&unit_setting(unit, key).join(" ").to_lowercase());
        if written != wanted {
            problems.push(format!(
                "{key}: written {written:?}, reaper needs exactly {wanted:?}"
            ));
        }
    }
    for (key, want) in [
        ("Type", "notify"),
        ("Restart", "on-failure"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("SystemCallArchitectures", "native"),
        ("RuntimeDirectory", "reaper"),
        ("RuntimeDirectoryMode", "0700"),
        // reaper reads every process's /proc/PID: /proc must not be filtered.
        ("ProtectProc", "default"),
        ("ProcSubset", "all"),
        ("LimitMEMLOCK", &u64::MAX.to_string()),
    ] {
        match loaded.get(key) {
            Some(got) if got == want => {}
            got => problems.push(format!("{key}: loaded {got:?}, expected {want:?}")),
        }
    }
    let filter = set(loaded.get("SystemCallFilter").map_or("", String::as_str));
    let denied: Vec<&str> = SYSCALLS
        .iter()
        .copied()
        .filter(|s| !filter.contains(*s))
        .collect();
    if !denied.is_empty() {
        problems.push(format!(
            "SystemCallFilter denies syscalls reaper makes: {denied:?}"
        ));
    }
    for unwanted in [
        "chown",
        "setuid",
        "setpriority",
        "init_module",
        "mount",
        "ptrace",
    ] {
        if filter.contains(unwanted) {
            problems.push(format!("SystemCallFilter allows {unwanted}"));
        }
    }
    // Settings the dump does not show: read them from the file.
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("ExecReload", "/bin/sh -c 'kill -HUP ${MAINPID}'"),
        ("RestartPreventExitStatus", "78"),
        ("WatchdogSec", "30s"),
        // The metrics endpoint answers loopback only; open files are bounded.
        ("IPAddressAllow", "localhost"),
        ("IPAddressDeny", "any"),
        ("LimitNOFILE", "4096"),
    ] {
        if unit_setting(unit, key) != [want] {
            problems.push(format!(
                "{key}: {:?}, expected {want:?}",
                unit_setting(unit, key)
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[test]
fn the_systemd_unit_verifies_and_keeps_what_reaper_needs() {
    ensure_tool("systemd-analyze", "systemd");
    let unit = unit_for_verify();
    if let Err(problems) = check_unit(&unit) {
        panic!("deploy/reaper.service:\n{problems}");
    }
    // The command lines are reaper's own: `run --config FILE` and `check`.
    let unit = read(&deploy("reaper.service"));
    for key in ["ExecStart", "ExecStartPre"] {
        for line in unit_setting(&unit, key) {
            let args: Vec<&str> = line.split_whitespace().skip(1).collect();
            reaper_accepts(&args).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }
    // (The check can fail: a misspelled flag or a bad value is refused.)
    assert!(reaper_accepts(&["run", "--configuration", "/etc/reaper/reaper.toml"]).is_err());
    assert!(reaper_accepts(&["run", "--metrics-addr", "localhost"]).is_err());
}

#[test]
fn broken_units_are_rejected() {
    ensure_tool("systemd-analyze", "systemd");
    let unit = unit_for_verify();
    let broken = |from: &str, to: &str| {
        assert!(unit.contains(from), "the unit has {from:?}");
        check_unit(&unit.replacen(from, to, 1)).expect_err(&format!("{to:?} is rejected"))
    };
    // systemd drops the unknown name silently; the loaded set shows it.
    let e = broken(
        "CapabilityBoundingSet=CAP_BPF ",
        "CapabilityBoundingSet=CAP_NOPE CAP_BPF ",
    );
    assert!(e.contains("CapabilityBoundingSet"), "{e}");
    let e = broken(
        "CapabilityBoundingSet=CAP_BPF ",
        "CapabilityBoundingSet=CAP_NOPE ",
    );
    assert!(e.contains("cap_bpf"), "{e}");
    // Unknown keys and bad values are warnings to systemd, errors here.
    let e = broken("NoNewPrivileges=yes", "NoNewPrivilege=yes");
    assert!(e.contains("NoNewPrivilege"), "{e}");
    let e = broken("Restart=on-failure", "Restart=sometimes");
    assert!(e.contains("sometimes"), "{e}");
    // A program that does not exist.
    let e = check_unit(&unit.replacen("ExecStart=/", "ExecStart=/nonexistent/", 1)).unwrap_err();
    assert!(e.contains("nonexistent"), "{e}");
    // Hiding other processes' /proc would blind reaper.
    let e = broken("ProtectHome=yes", "ProtectHome=yes\nProtectProc=invisible");
    assert!(e.contains("ProtectProc"), "{e}");
    // Without the deny, the allow list allows everything.
    let e = broken("IPAddressDeny=any\n", "");
    assert!(e.contains("IPAddressDeny"), "{e}");
    let e = broken("LimitNOFILE=4096", "LimitNOFILE=infinity");
    assert!(e.contains("LimitNOFILE"), "{e}");
    // bpf(2) and capset(2) live in @privileged: dropping either explicit allow breaks reaper.
    let e = broken("SystemCallFilter=bpf capset\n", "SystemCallFilter=capset\n");
    assert!(e.contains("bpf"), "{e}");
    let e = broken("SystemCallFilter=bpf capset\n", "SystemCallFilter=bpf\n");
    assert!(e.contains("capset"), "{e}");
}

#[test]
fn the_units_sandbox_is_rated_ok() {
    ensure_tool("systemd-analyze", "systemd");
    let dir = TempDir::new("security");
    let path = dir.write("reaper.service", &unit_for_verify());
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path));
    let all = text(&out);
    let exposure = all
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for reaper.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{all}"));
    eprintln!("systemd-analyze security: exposure {exposure} (0 = locked down, 10 = exposed)");
    assert!(
        exposure <= 3.0,
        "the sandbox got weaker: exposure {exposure}\n{all}"
    );
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Runs `reaper run` with exactly the unit's capability set, under no_new_privs, as the unit
/// does, with the shipped config: it must attach, scan /proc and serve /healthz. (The mount
/// namespace options are systemd's alone; the capability set is where a mistake would bite.)
#[test]
fn reaper_runs_with_the_units_capabilities() {
    ensure_tool("setpriv", "util-linux");
    let unit = read(&deploy("reaper.service"));
    let caps = unit_setting(&unit, "CapabilityBoundingSet");
    let [caps] = caps.as_slice() else {
        panic!("one CapabilityBoundingSet line in the unit, not {caps:?}")
    };
    let setpriv_caps = std::iter::once("-all".to_owned())
        .chain(
            caps.split_whitespace()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let wanted_bits: u64 = caps
        .split_whitespace()
        .map(|c| match c {
            "CAP_DAC_READ_SEARCH" => reaper::check::CAP_DAC_READ_SEARCH,
            "CAP_KILL" => reaper::check::CAP_KILL,
            "CAP_SYS_PTRACE" => reaper::check::CAP_SYS_PTRACE,
            "CAP_PERFMON" => reaper::check::CAP_PERFMON,
            "CAP_BPF" => reaper::check::CAP_BPF,
            other => panic!("unexpected capability {other} in the unit"),
        })
        .fold(0, |bits, cap| bits | 1 << cap);

    let dir = TempDir::new("caps");
    let config = dir.write("reaper.toml", &read(&deploy("reaper.toml")));
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let socket = dir.0.join("reaper.sock");
    let port = free_port();
    let mut child = Command::new("setpriv")
        .args(["--no-new-privs"])
        .arg(format!("--bounding-set={setpriv_caps}"))
        .arg(format!("--inh-caps={setpriv_caps}"))
        .arg(format!("--ambient-caps={setpriv_caps}"))
        .arg(reaper_bin())
        .args(["run", "--dry-run", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start setpriv reaper run");
    let pid = child.id();
    let started = Instant::now();
    // The port is bound before the pipeline starts (while privileges last): until the tree
    // task runs, /healthz says 503.
    let mut last = None;
    let healthy = loop {
        if let Some(response) = http_get(port, "/healthz") {
            if response.starts_with("HTTP/1.1 200") {
                break Some(response);
            }
            last = Some(response);
        }
        if child.try_wait().ok().flatten().is_some() || started.elapsed() > DEADLINE {
            break last;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Every thread: capabilities and no_new_privs are per thread.
    let threads: Vec<(u32, Option<u64>, Option<u64>, bool)> = reaper_tests::thread_statuses(pid)
        .iter()
        .map(|(tid, status)| {
            (
                *tid,
                reaper_tests::status_mask(status, "CapEff"),
                reaper_tests::status_mask(status, "CapPrm"),
                reaper_tests::status_field(status, "NoNewPrivs") == Some("1"),
            )
        })
        .collect();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let out = child.wait_with_output().expect("wait for reaper");
    let log = String::from_utf8_lossy(&out.stderr);
    let response = healthy.unwrap_or_else(|| {
        panic!("reaper never served /healthz with the unit's capabilities:\n{log}")
    });
    assert!(
        response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
        "{response}\n{log}"
    );
    // It starts with the unit's set (attaching needs CAP_PERFMON too), then keeps only what
    // running needs: a subset of the unit's, exactly what reaper::privileges::KEPT lists for
    // a dry run (no CAP_KILL), dropped without a warning.
    let kept_bits: u64 = reaper::privileges::kept(reaper::config::Mode::DryRun)
        .fold(0, |bits, k| bits | 1 << k.cap.index());
    assert_eq!(
        kept_bits,
        (1 << 2) | (1 << 19) | (1u64 << 39),
        "dry run: CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_BPF"
    );
    assert_eq!(
        kept_bits & !wanted_bits,
        0,
        "KEPT is within the unit's capabilities"
    );
    assert!(
        threads.len() >= 3,
        "the daemon's runtime threads: {threads:?}"
    );
    for (tid, cap_eff, cap_prm, nnp) in &threads {
        assert_eq!(
            (*cap_eff, *cap_prm),
            (Some(kept_bits), Some(kept_bits)),
            "after attaching, thread {tid} holds exactly what reaper keeps:\n{log}"
        );
        assert!(nnp, "thread {tid} runs under no_new_privs");
    }
    assert!(
        !log.contains("could not drop capabilities"),
        "dropping capabilities failed under the unit's set:\n{log}"
    );
    assert!(
        out.status.success(),
        "reaper stops cleanly on SIGTERM ({}):\n{log}",
        out.status
    );
    assert!(log.contains("attached to sched_process_fork"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Prometheus rules and the Grafana dashboard.

/// Metric-like names in a PromQL expression (identifiers outside string literals and `[...]`
/// durations).
fn names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = expr.chars().peekable();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut bracket = false;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == '\\' {
                chars.next();
            } else if c == q {
                quote = None;
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if !word.is_empty() && !bracket && !word.starts_with(|d: char| d.is_ascii_digit()) {
            names.push(std::mem::take(&mut word));
        }
        word.clear();
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '[' => bracket = true,
            ']' => bracket = false,
            _ => {}
        }
    }
    if !word.is_empty() && !bracket {
        names.push(word);
    }
    names
}

fn known_metric(name: &str) -> bool {
    METRICS.contains(&name)
        || SERVICE_METRICS.contains(&name)
        || name
            .strip_prefix(HISTOGRAM)
            .is_some_and(|suffix| HISTOGRAM_SUFFIXES.contains(&suffix))
}

/// Problems with one expression: reaper_* names that reaper does not export, or no metric at all.
fn expr_problems(expr: &str) -> Vec<String> {
    let names = names_in(expr);
    let mut problems: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("reaper_") && !known_metric(n))
        .map(|n| format!("{n} is not a reaper metric (in {expr:?})"))
        .collect();
    if !names.iter().any(|n| known_metric(n) || n == "up") {
        problems.push(format!("{expr:?} queries no reaper metric"));
    }
    problems
}

#[test]
fn the_metric_name_checker_catches_typos() {
    assert_eq!(
        names_in(
            r#"sum by (kind) (rate(reaper_events_total{instance=~"$instance"}[$__rate_interval]))"#
        ),
        [
            "sum",
            "by",
            "kind",
            "rate",
            "reaper_events_total",
            "instance"
        ]
    );
    assert!(
        expr_problems(
            "histogram_quantile(0.99, sum by (le) (rate(reaper_kill_delay_seconds_bucket[5m])))"
        )
        .is_empty()
    );
    assert!(
        expr_problems(r#"up{job="reaper_kills"} == 0"#).is_empty(),
        "label values are not names"
    );
    assert_eq!(expr_problems("rate(reaper_kils_total[5m])").len(), 2);
    assert_eq!(expr_problems("reaper_targets_bucket").len(), 2);
    assert_eq!(expr_problems("vector(1)").len(), 1);
}

/// Every alert expression, from the rules file (the `expr:` values, folded or not).
fn alert_exprs(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with(">-") || rest.starts_with('|') || rest.starts_with('>') {
            let indent = |l: &str| l.len() - l.trim_start().len();
            let base = indent(line);
            let body: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || indent(l) > base)
                .map(|l| l.trim())
                .collect();
            exprs.push(body.join(" ").trim().to_owned());
        } else {
            exprs.push(rest.to_owned());
        }
    }
    exprs
}

#[test]
fn the_alerting_rules_pass_promtool_and_their_unit_tests() {
    ensure_tool("promtool", "prometheus");
    let rules = deploy("prometheus/alerts.yml");
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules));
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("SUCCESS: 9 rules found"),
        "{}",
        text(&out)
    );
    let out = run(Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(deploy("prometheus")));
    assert!(
        out.status.success(),
        "promtool test rules alerts.test.yml:\n{}",
        text(&out)
    );

    let text_rules = read(&rules);
    for alert in [
        "ReaperDown",
        "ReaperEventsLost",
        "ReaperKillFailures",
        "ReaperLeakedTargetsPilingUpInDryRun",
        "ReaperTargetsPilingUp",
        "ReaperDecodeErrors",
        "ReaperSlowKills",
        "ReaperNoEvents",
    ] {
        assert!(
            text_rules.contains(&format!("- alert: {alert}\n")),
            "{alert} is defined"
        );
    }
    // promtool accepts any metric name: check them against what reaper exports.
    let exprs = alert_exprs(&text_rules);
    assert_eq!(exprs.len(), 9, "{exprs:#?}");
    let problems: Vec<String> = exprs.iter().flat_map(|e| expr_problems(e)).collect();
    assert!(problems.is_empty(), "{problems:#?}");
    for annotation in ["summary:", "description:", "runbook:"] {
        assert_eq!(
            text_rules.matches(annotation).count(),
            9,
            "every alert has a {annotation}"
        );
    }
}

#[test]
fn broken_alerting_rules_are_rejected() {
    ensure_tool("promtool", "prometheus");
    let dir = TempDir::new("rules");
    let rules = read(&deploy("prometheus/alerts.yml"));
    let check = |text: &str| {
        let path = dir.write("alerts.yml", text);
        run(Command::new("promtool").arg("check").arg("rules").arg(path))
    };
    assert!(check(&rules).status.success());
    for (from, to) in [
        (r#"up{job="reaper"} == 0"#, r#"up{job="reaper" == 0"#), // PromQL syntax
        ("for: 5m", "for: 5 minutes"),                           // bad duration
        (
            "$labels.instance }} lost kernel",
            "$labels.instance } lost kernel",
        ), // template
    ] {
        assert!(rules.contains(from), "{from:?}");
        let out = check(&rules.replacen(from, to, 1));
        assert!(
            !out.status.success(),
            "promtool accepted {to:?}:\n{}",
            text(&out)
        );
    }
    // A changed threshold breaks the unit tests.
    let dir_tests = TempDir::new("rule-tests");
    dir_tests.write("alerts.yml", &rules.replacen("> 10\n", "> 20\n", 1));
    dir_tests.write(
        "alerts.test.yml",
        &read(&deploy("prometheus/alerts.test.yml")),
    );
    let out = run(Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir_tests.0));
    assert!(
        !out.status.success(),
        "the rule tests missed a changed threshold:\n{}",
        text(&out)
    );
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        all.push(p);
    }
    all
}

#[test]
fn the_dashboard_queries_only_reaper_metrics() {
    let text_dashboard = read(&deploy("grafana/reaper-dashboard.json"));
    let dashboard: Value = serde_json::from_str(&text_dashboard).expect("the dashboard is JSON");
    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "a Prometheus data source variable"
    );

    let mut exprs = Vec::new();
    let mut titles = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for p in panels(&dashboard) {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "panel ids are unique"
        );
        titles.insert(title.to_owned());
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title} uses the variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} queries something");
        for t in targets {
            exprs.push(t["expr"].as_str().expect("a PromQL expr").to_owned());
        }
    }
    for want in [
        "Events/s by kind",
        "Lost events and decode errors",
        "Process tree size",
        "Targets by state",
        "Kills by reason",
        "Would-kills (dry-run)",
        "Reclaimed memory",
        "Kill delay p50 / p99",
        "Reconcile corrections",
    ] {
        assert!(titles.contains(want), "a panel {want:?}, have {titles:?}");
    }
    let problems: Vec<String> = exprs.iter().flat_map(|e| expr_problems(e)).collect();
    assert!(problems.is_empty(), "{problems:#?}");
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| names_in(e)).collect();
    for metric in METRICS {
        let shown = used.contains(metric)
            || (metric == HISTOGRAM && used.contains(&format!("{HISTOGRAM}_bucket")));
        assert!(shown, "the dashboard shows {metric}");
    }
    assert!(
        text_dashboard.contains("histogram_quantile(0.5,")
            && text_dashboard.contains("histogram_quantile(0.99,")
    );

    // Valid PromQL once Grafana's variables are filled in: promtool parses them as rules.
    ensure_tool("promtool", "prometheus");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__range", "6h")
            .replace("$instance", ".*")
            .replace("$job", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:panel_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = TempDir::new("dashboard");
    let path = dir.write("dashboard-rules.yml", &rules);
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path));
    assert!(
        out.status.success(),
        "the dashboard's queries:\n{}\n{rules}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// The example configuration.

fn same_as_builtin(config: Config) -> Config {
    Config {
        origin: Config::builtin().origin,
        ..config
    }
}

#[test]
fn the_example_config_is_the_builtin_default() {
    let path = deploy("reaper.toml");
    let text_config = read(&path);
    let config = parse(&text_config, "deploy/reaper.toml", &Overrides::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let builtin = Config::builtin();
    assert_eq!(config.mode, Mode::Enforce);
    assert_eq!(
        config.rules, builtin.rules,
        "same rules, timeouts and thresholds"
    );
    assert_eq!(
        same_as_builtin(config),
        builtin,
        "every setting equals the built-in default"
    );

    // And through the real loader (which checks who can write the file).
    let dir = TempDir::new("config");
    let copy = dir.write("reaper.toml", &text_config);
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loaded = Config::load(&copy, &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(same_as_builtin(loaded), builtin);
}

#[test]
fn every_key_of_the_example_config_is_documented() {
    let text_config = read(&deploy("reaper.toml"));
    for key in [
        "mode",
        "idle_timeout",
        "cpu_threshold_percent",
        "orphan_grace",
        "grace",
        "max_kills_per_minute",
        "metrics_addr",
        "reconcile_interval",
        "ring_bytes",
        "activity_source",
        "io_bytes_per_second",
        "name",
        "comm",
        "argv_any",
        "require_no_tty",
        "parent_comm",
    ] {
        let lines: Vec<&str> = text_config.lines().collect();
        let at = lines
            .iter()
            .position(|l| {
                let l = l.trim_start_matches("# ");
                l.starts_with(&format!("{key} = "))
            })
            .unwrap_or_else(|| panic!("{key} is in deploy/reaper.toml"));
        assert!(
            at > 0 && lines[at - 1].starts_with('#'),
            "{key} has a comment above it"
        );
    }
    for value in [
        "\"enforce\"",
        "\"dry-run\"",
        "\"auto\"",
        "\"socket\"",
        "\"proc-io\"",
    ] {
        assert!(text_config.contains(value), "{value} is explained");
    }
}

/// The commented-out examples (`# key = value`) are valid too: uncommented, they parse and
/// take effect.
#[test]
fn the_example_configs_optional_settings_parse() {
    let text_config = read(&deploy("reaper.toml"));
    let mut uncommented = 0;
    let enabled: String = text_config
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(key, _)| {
                    key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                uncommented += 1;
                format!("{rest}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    assert_eq!(
        uncommented, 4,
        "parent_comm, idle_timeout, orphan_grace, cpu_threshold_percent"
    );
    let config =
        parse(&enabled, "uncommented", &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
    let rule = &config.rules[0];
    assert_eq!(rule.parent_comm, ["node", "python3", "bun"]);
    assert_eq!(rule.idle_timeout, Duration::from_secs(30 * 60));
    assert_eq!(rule.orphan_grace, Duration::from_secs(120));
    assert!((rule.cpu_threshold - 0.05).abs() < 1e-9);
}

// ---------------------------------------------------------------------------------------------
// The Kubernetes DaemonSet.

#[test]
fn the_daemonset_runs_reaper_as_the_unit_does() {
    let path = deploy("kubernetes/daemonset.yaml");
    let text_yaml = read(&path);
    // The strings an operator looks for, as written.
    for needle in [
        "hostPID: true",
        "privileged: false",
        "prometheus.io/scrape: \"true\"",
        "prometheus.io/port: \"9847\"",
        "prometheus.io/path: /metrics",
        "path: /healthz",
        "--metrics-addr=0.0.0.0:9847",
        "namespace: reaper-system",
    ] {
        assert!(text_yaml.contains(needle), "daemonset.yaml has {needle:?}");
    }

    let docs = yaml_documents(&path);
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("a {k} in daemonset.yaml"))
    };
    assert_eq!(kind("Namespace")["metadata"]["name"], "reaper-system");
    for d in docs.iter().filter(|d| d["kind"] != "Namespace") {
        assert_eq!(d["metadata"]["namespace"], "reaper-system", "{}", d["kind"]);
    }
    let ds = kind("DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let template = &ds["spec"]["template"];
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        template["metadata"]["labels"]["app.kubernetes.io/name"]
    );
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9847");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let pod = &template["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"run") && args.contains(&"--metrics-addr=0.0.0.0:9847"),
        "{args:?}"
    );
    assert!(
        args.contains(&"--config=/etc/reaper/reaper.toml"),
        "{args:?}"
    );
    reaper_accepts(&args).unwrap_or_else(|e| panic!("the container's args: {e}"));
    assert_eq!(c["ports"][0]["containerPort"], 9847);
    let port_name = c["ports"][0]["name"].clone();

    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let added: BTreeSet<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| format!("cap_{}", c.as_str().unwrap().to_lowercase()))
        .collect();
    let wanted: BTreeSet<String> = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
    assert_eq!(added, wanted, "the same capabilities as the systemd unit");

    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], "/healthz", "{probe}");
        assert!(
            get["port"] == port_name || get["port"] == 9847,
            "{probe} port"
        );
    }
    let resources = &c["resources"];
    for key in ["requests", "limits"] {
        assert!(
            resources[key]["memory"].is_string(),
            "resources.{key}.memory"
        );
    }

    let mounts: BTreeMap<&str, &Value> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap(), m))
        .collect();
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let btf = mounts
        .get("/sys/kernel/btf")
        .expect("/sys/kernel/btf is mounted");
    assert_eq!(btf["readOnly"], true);
    let btf_volume = volumes[btf["name"].as_str().unwrap()];
    assert_eq!(btf_volume["hostPath"]["path"], "/sys/kernel/btf");
    assert!(
        mounts.contains_key("/run/reaper"),
        "a writable socket directory"
    );
    // Only BTF tracepoints are attached: tracefs (or debugfs) would be a needless window on
    // the node's kernel.
    for path in ["/sys/kernel/tracing", "/sys/kernel/debug"] {
        assert!(
            !volumes.values().any(|v| v["hostPath"]["path"]
                .as_str()
                .is_some_and(|p| p.starts_with(path))),
            "{path} is mounted, but reaper does not use it"
        );
    }
    let config_mount = mounts.get("/etc/reaper").expect("the config is mounted");
    let config_volume = volumes[config_mount["name"].as_str().unwrap()];
    let map_name = config_volume["configMap"]["name"]
        .as_str()
        .expect("from a ConfigMap");
    let mode = config_volume["configMap"]["defaultMode"]
        .as_u64()
        .unwrap_or(0o644);
    assert_eq!(
        mode & 0o022,
        0,
        "reaper refuses a config group or others can write"
    );

    // The ConfigMap's reaper.toml: the built-in default, listening on all interfaces.
    let map = kind("ConfigMap");
    assert_eq!(map["metadata"]["name"], map_name);
    let toml = map["data"]["reaper.toml"]
        .as_str()
        .expect("reaper.toml in the ConfigMap");
    let config = parse(toml, "ConfigMap", &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.metrics_addr.to_string(), "0.0.0.0:9847");
    let builtin = Config::builtin();
    assert_eq!(
        same_as_builtin(Config {
            metrics_addr: builtin.metrics_addr,
            ..config
        }),
        builtin
    );
}

// ---------------------------------------------------------------------------------------------
// Schemas, the image name and the prometheus-operator resources.

/// Cargo's target directory (the test executable is `<target>/<profile>/deps/<name>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<exe>")
        .to_owned()
}

/// `kubernetes-validate` (PyPI), in a virtualenv under the target directory, installed once.
fn kubernetes_validate() -> PathBuf {
    const VERSION: &str = "1.37.0";
    // Made in place (a virtualenv's scripts name its own path), done when the stamp exists.
    let venv = target_dir().join(format!("kubernetes-validate-{VERSION}"));
    let bin = venv.join("bin/kubernetes-validate");
    let stamp = venv.join("installed");
    if stamp.exists() {
        return bin;
    }
    ensure_tool("python3", "python3");
    let _ = std::fs::remove_dir_all(&venv);
    let make = || run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    if !make().status.success() {
        // Debian's python3 keeps venv in a package of its own.
        reaper_tests::ensure_package("python3-venv");
        let _ = std::fs::remove_dir_all(&venv);
        let out = make();
        assert!(out.status.success(), "python3 -m venv: {}", text(&out));
    }
    let started = Instant::now();
    let out = run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("kubernetes-validate=={VERSION}")));
    assert!(
        out.status.success(),
        "pip install kubernetes-validate: {}",
        text(&out)
    );
    std::fs::write(&stamp, "").expect("the stamp");
    eprintln!(
        "installed kubernetes-validate {VERSION} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    bin
}

/// Validates a manifest against the Kubernetes API schemas of `version` (strict: unknown
/// fields are errors). Ok(report) or Err(report).
fn validate_manifest(path: &Path, version: &str) -> Result<String, String> {
    let out = run(Command::new(kubernetes_validate())
        .args(["--strict", "--kubernetes-version", version])
        .arg(path));
    if out.status.success() {
        Ok(text(&out))
    } else {
        Err(text(&out))
    }
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas() {
    // 1.30 is the first with securityContext.appArmorProfile; 1.37 the newest the tool knows.
    let path = deploy("kubernetes/daemonset.yaml");
    for version in ["1.30.0", "1.37.0"] {
        let report = validate_manifest(&path, version)
            .unwrap_or_else(|e| panic!("Kubernetes {version}:\n{e}"));
        for kind in [
            "namespace/reaper-system",
            "serviceaccount/reaper",
            "configmap/reaper-config",
            "daemonset/reaper",
        ] {
            assert!(
                report.contains(&format!("passed for resource {kind}")),
                "{report}"
            );
        }
    }
    // A field in the wrong place and a wrongly typed one are refused.
    let dir = TempDir::new("k8s");
    for (from, to) in [
        ("      hostPID: true", "      hostPid: true"),
        (
            "              containerPort: 9847",
            "              containerPort: \"9847\"",
        ),
    ] {
        let yaml = read(&path);
        assert!(yaml.contains(from), "{from:?}");
        let broken = dir.write("broken.yaml", &yaml.replacen(from, to, 1));
        let e = validate_manifest(&broken, "1.37.0").expect_err(&format!("{to:?} was accepted"));
        assert!(e.contains("daemonset"), "{e}");
    }
}

#[test]
fn the_daemonset_runs_the_built_image_on_linux_amd64_nodes() {
    let docs = yaml_documents(&deploy("kubernetes/daemonset.yaml"));
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    // `cargo xtask dist` names the image localhost/reaper:<workspace version>.
    assert_eq!(
        pod["containers"][0]["image"],
        format!("localhost/reaper:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/arch"], "amd64");
}

#[test]
fn the_prometheus_operator_resources_match_the_plain_files() {
    // The PrometheusRule's groups are alerts.yml's, which promtool checks and tests.
    let rule = yaml_documents(&deploy("kubernetes/prometheusrule.yaml"));
    let [rule] = rule.as_slice() else {
        panic!("one document")
    };
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], "reaper-system");
    let alerts = yaml_documents(&deploy("prometheus/alerts.yml"));
    assert_eq!(
        rule["spec"]["groups"], alerts[0]["groups"],
        "prometheusrule.yaml and alerts.yml differ"
    );

    // The PodMonitor selects the DaemonSet's pods, scrapes its named port, and names the job
    // "reaper" (what ReaperDown looks for).
    let monitor = yaml_documents(&deploy("kubernetes/podmonitor.yaml"));
    let [monitor] = monitor.as_slice() else {
        panic!("one document")
    };
    assert_eq!(monitor["kind"], "PodMonitor");
    assert_eq!(monitor["metadata"]["namespace"], "reaper-system");
    let docs = yaml_documents(&deploy("kubernetes/daemonset.yaml"));
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&labels[key], value, "the PodMonitor selects on {key}");
    }
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(labels[job_label], "reaper", "the job is named reaper");
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        endpoint["port"],
        ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    );
    assert_eq!(endpoint["path"], "/metrics");
    let rules = read(&deploy("prometheus/alerts.yml"));
    assert!(
        rules.contains("up{job=\"reaper\"}") && rules.contains("absent("),
        "ReaperDown"
    );
}

#[test]
fn every_alert_has_a_runbook_section() {
    let alerts = yaml_documents(&deploy("prometheus/alerts.yml"));
    let runbook = read(&deploy("prometheus/runbook.md"));
    let mut seen = 0;
    for rule in alerts[0]["groups"][0]["rules"].as_array().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no runbook_url"));
        assert_eq!(
            url,
            format!("deploy/prometheus/runbook.md#{}", name.to_lowercase())
        );
        assert!(
            runbook.contains(&format!("\n## {name}\n")),
            "runbook.md has no section {name}"
        );
        seen += 1;
    }
    assert_eq!(
        seen,
        runbook.matches("\n## ").count(),
        "a runbook section per alert, no more"
    );
}
