//! The `reaper` command line end to end, as a person uses it: start `reaper run` on a socket
//! of its own, ask it with `reaper tree` / `reaper stats`, follow `reaper events`, stop it with
//! a signal. `target/<profile>/reaper` must be built first (`cargo xtask test` does it).
//!
//! Each test starts the processes it talks to and stops only those; every wait has a deadline.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::FileTypeExt as _, fs::PermissionsExt as _},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::sys::signal::{Signal, kill};
use reaper_tests::{
    DEADLINE, Daemon, Helper, POLL, Running, TempDir, free_port, helper_path, proc_stat,
    reaper_bin, reaper_cli, reaper_ok, status_field, status_mask, thread_statuses,
};
use serde_json::Value;

/// `reaper run --dry-run` on a socket of its own in `dir`, its log in `<dir>/daemon.log`.
fn start_daemon(dir: &TempDir) -> Daemon {
    start_daemon_with(dir, &[])
}

/// With extra `reaper run` arguments (e.g. `--config FILE`).
fn start_daemon_with(dir: &TempDir, extra: &[&str]) -> Daemon {
    // Dry run: the built-in rule matches any SDK-spawned claude on the host, and tests
    // only ever signal processes they started. Its own port, so tests never collide with
    // a daemon already running on the default one.
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    Daemon::start(dir, "daemon", ["--dry-run"].iter().chain(extra), metrics)
}

/// One line of `reaper tree`: `PID PPID START UID  <indent>COMM  ARGV`.
#[derive(Debug)]
struct Row {
    pid: u32,
    ppid: u32,
    depth: usize,
    comm: String,
    line: String,
}

fn parse_tree(text: &str) -> Vec<Row> {
    let mut lines = text.lines();
    let header = lines.next().expect("a header line");
    assert!(
        header
            .split_whitespace()
            .take(4)
            .eq(["PID", "PPID", "START", "UID"]),
        "{header:?}"
    );
    lines
        .map(|line| {
            let mut rest = line;
            let mut numbers = [0u64; 4];
            for n in &mut numbers {
                rest = rest.trim_start_matches(' ');
                let end = rest.find(' ').unwrap_or(rest.len());
                *n = rest[..end]
                    .parse()
                    .unwrap_or_else(|_| panic!("a number in {line:?}"));
                rest = &rest[end..];
            }
            let rest = rest
                .strip_prefix("  ")
                .unwrap_or_else(|| panic!("two spaces before the comm: {line:?}"));
            let indent = rest.len() - rest.trim_start_matches(' ').len();
            let comm = rest[indent..].split("  ").next().unwrap_or_default();
            Row {
                pid: u32::try_from(numbers[0]).expect("pid"),
                ppid: u32::try_from(numbers[1]).expect("ppid"),
                depth: indent / 2,
                comm: comm.to_owned(),
                line: line.to_owned(),
            }
        })
        .collect()
}

#[test]
fn tree_shows_this_test_and_the_child_it_spawned() {
    let dir = TempDir::new("tree");
    // The helper named by a rule, so its exec carries its argv (the kernel sends argv only for
    // candidates by name and watched processes) and the tree shows it.
    let text = format!(
        "{}\n{}",
        reaper::config::DEFAULT_TOML,
        reaper_tests::argv_rule(reaper_tests::HELPER)
    );
    let config = dir.write("reaper.toml", &text);
    let daemon = start_daemon_with(&dir, &["--config", config.to_str().unwrap()]);
    let me = std::process::id();
    let my_stat = proc_stat(me).expect("/proc/self/stat");
    // A multi-line argument (like a `bash -c` script another process on the host may run)
    // must not break `reaper tree`'s one-process-per-line output.
    let mut helper = Helper::spawn(&["wait", "script='#!/bin/sh\necho hi'"]);
    let child = helper.read_pid("pid");

    // The daemon applies the helper's fork and exec shortly after they happen.
    let started = Instant::now();
    let (rows, mine, theirs) = loop {
        let text = reaper_ok(["tree", "--socket", daemon.socket_arg()]);
        let rows = parse_tree(&text);
        let mine = rows.iter().position(|r| r.pid == me);
        let theirs = rows
            .iter()
            .position(|r| r.pid == child && r.comm == "lifecycle-helpe");
        if let (Some(mine), Some(theirs)) = (mine, theirs) {
            break (rows, mine, theirs);
        }
        assert!(
            started.elapsed() < DEADLINE,
            "`reaper tree` never showed this test ({me}) and its helper ({child}):\n{text}"
        );
        std::thread::sleep(POLL);
    };
    let (row, child_row) = (&rows[mine], &rows[theirs]);
    assert!(
        child_row
            .line
            .ends_with(r#"wait "script='#!/bin/sh\necho hi'""#),
        "the newline is shown escaped: {child_row:?}"
    );
    assert_eq!(row.ppid, my_stat.ppid, "this test's parent: {row:?}");
    assert_eq!(row.comm, my_stat.comm, "this test's comm: {row:?}");
    assert_eq!(child_row.ppid, me, "{child_row:?}");
    // Drawn under this test: after it, one level deeper, and inside its subtree.
    assert!(
        theirs > mine,
        "the child is listed after its parent: {rows:?}"
    );
    assert_eq!(child_row.depth, row.depth + 1, "{rows:?}");
    assert!(
        rows[mine + 1..theirs].iter().all(|r| r.depth > row.depth),
        "the child is in this test's subtree: {rows:?}"
    );

    let json: Value = serde_json::from_str(&reaper_ok([
        "tree",
        "--json",
        "--socket",
        daemon.socket_arg(),
    ]))
    .expect("`reaper tree --json` prints JSON");
    let processes = json.as_array().expect("a JSON array of processes");
    let find = |pid: u32| {
        processes
            .iter()
            .find(|p| p["id"]["pid"].as_u64() == Some(u64::from(pid)))
            .unwrap_or_else(|| panic!("{pid} is not in the JSON tree"))
    };
    let mine = find(me);
    assert_eq!(mine["ppid"].as_u64(), Some(u64::from(my_stat.ppid)));
    assert_eq!(mine["comm"].as_str(), Some(my_stat.comm.as_str()));
    assert_eq!(
        mine["id"]["start_ticks"].as_u64(),
        Some(my_stat.start_ticks)
    );
    let children = mine["children"].as_array().expect("children");
    assert!(
        children
            .iter()
            .any(|c| c.as_u64() == Some(u64::from(child))),
        "{children:?}"
    );
    let theirs = find(child);
    assert_eq!(theirs["ppid"].as_u64(), Some(u64::from(me)));
    assert_eq!(theirs["comm"].as_str(), Some("lifecycle-helpe"));
    helper.finish();
}

#[test]
fn the_socket_is_private_and_stats_are_json() {
    let dir = TempDir::new("stats");
    let daemon = start_daemon(&dir);
    let meta = std::fs::metadata(&daemon.socket).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "socket mode {:o}",
        meta.permissions().mode()
    );

    // Every `reaper stats` is itself a fork, an exec and an exit: the count starts moving.
    let started = Instant::now();
    loop {
        let text = reaper_ok(["stats", "--json", "--socket", daemon.socket_arg()]);
        let stats: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        let events = stats["events_total"]
            .as_u64()
            .unwrap_or_else(|| panic!("no events_total: {text}"));
        assert!(
            stats["lost_total"].as_u64().is_some(),
            "no lost_total: {text}"
        );
        if events > 0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the daemon counted no events: {text}"
        );
        std::thread::sleep(POLL);
    }
}

#[test]
fn tree_without_a_daemon_names_the_socket() {
    let dir = TempDir::new("nodaemon");
    // Nothing at the path, then a socket file nobody listens on (a daemon that died).
    let missing = dir.join("missing.sock");
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind a socket"));
    for socket in [&missing, &stale] {
        let shown = socket.to_str().expect("UTF-8 path");
        let out = reaper_cli(["tree", "--socket", shown]);
        assert!(
            !out.status.success(),
            "`reaper tree` succeeded without a daemon: {}",
            out.stdout
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "an error exit, not a crash: {}",
            out.status
        );
        assert!(
            out.stderr.contains(shown),
            "the error names {shown}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("reaper run"),
            "the error says what to start: {}",
            out.stderr
        );
        for noise in ["panicked", "backtrace", "RUST_BACKTRACE"] {
            assert!(
                !out.stderr.contains(noise),
                "{noise:?} in the error: {}",
                out.stderr
            );
        }
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
}

/// Lines from a reader, read by a thread so that every wait has a deadline.
fn lines(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line matching `check`; returns it and the lines before it.
fn wait_line(
    lines: &mpsc::Receiver<String>,
    what: &str,
    mut check: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let done = check(&line);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(err) => panic!(
                "no {what} ({err}); last lines: {:#?}",
                &seen[seen.len().saturating_sub(20)..]
            ),
        }
    }
}

#[test]
fn events_json_streams_an_exit_and_stops_on_sigint() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "`reaper events` loads eBPF programs: run as root"
    );
    let mut child = Command::new(reaper_bin())
        .args(["events", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reaper events");
    let (stdout, stderr) = (
        lines(child.stdout.take().unwrap()),
        lines(child.stderr.take().unwrap()),
    );
    let mut events = Running::new(child, "reaper events --json");
    // It says so on stderr once the probes are attached.
    wait_line(&stderr, "`following …` on stderr", |l| {
        l.starts_with("following")
    });

    let mut helper = Command::new(helper_path())
        .args(["exit", "5"])
        .spawn()
        .expect("spawn lifecycle-helper");
    let pid = u64::from(helper.id());
    assert_eq!(helper.wait().expect("wait for the helper").code(), Some(5));

    let mut kinds = std::collections::BTreeSet::new();
    let seen = wait_line(&stdout, "exit event with code 5 for the helper", |line| {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let kind = event["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("no kind: {line}"))
            .to_owned();
        let found = kind == "exit"
            && event["id"]["pid"].as_u64() == Some(pid)
            && event["status"]["code"].as_u64() == Some(5);
        kinds.insert(kind);
        found
    });
    assert!(
        kinds
            .iter()
            .all(|k| ["fork", "exec", "exit", "rename"].contains(&k.as_str())),
        "{kinds:?}"
    );
    // The helper's own fork and exec came before its exit.
    let about_helper = |kind: &str| {
        seen.iter().find_map(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            (e["kind"] == kind && e["id"]["pid"].as_u64() == Some(pid)).then_some(e)
        })
    };
    let exec = about_helper("exec");
    assert!(
        about_helper("fork").is_some() && exec.is_some(),
        "fork and exec of {pid} before its exit"
    );
    // Whole, though no rule names it (the daemon's records of such an exec are its head
    // alone): its time, path and argv.
    let exec = exec.unwrap();
    let helper_path = helper_path();
    assert!(exec["time_ns"].as_u64().is_some(), "{exec}");
    assert_eq!(exec["filename"], helper_path.to_str().unwrap(), "{exec}");
    assert_eq!(
        exec["argv"],
        serde_json::json!([helper_path.to_str().unwrap(), "exit", "5"]),
        "{exec}"
    );

    let status = events.stop(Signal::SIGINT);
    assert!(status.success(), "`reaper events` after SIGINT: {status}");
}

#[test]
fn sigterm_stops_the_daemon_cleanly() {
    let dir = TempDir::new("sigterm");
    let mut daemon = start_daemon(&dir);
    assert!(daemon.socket.exists());
    let status = daemon.process.stop(Signal::SIGTERM);
    assert!(
        status.success(),
        "reaper run after SIGTERM: {status}; its log:\n{}",
        daemon.log()
    );
    assert!(
        !daemon.socket.exists(),
        "{} left behind",
        daemon.socket.display()
    );
}

// --- the metrics endpoint --------------------------------------------------------------

#[test]
fn metrics_are_valid_prometheus_and_health_is_ok() {
    let dir = TempDir::new("metrics");
    let daemon = start_daemon(&dir);
    let (status, body) = http_get(daemon.metrics, "/healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(daemon.metrics, "/metrics");
    assert_eq!(status, 200);
    for family in [
        "reaper_events_total",
        "reaper_events_lost_total",
        "reaper_decode_errors_total",
        "reaper_processes",
        "reaper_kill_delay_seconds_bucket",
        "reaper_reclaimed_bytes_total",
        "reaper_build_info",
    ] {
        assert!(body.contains(family), "{family} missing from:\n{body}");
    }
    let (status, _) = http_get(daemon.metrics, "/nothing-here");
    assert_eq!(status, 404);

    reaper_tests::ensure_tool("promtool", "prometheus");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_real_prometheus_scrapes_the_daemon() {
    reaper_tests::ensure_tool("prometheus", "prometheus");
    let dir = TempDir::new("prometheus");
    let daemon = start_daemon(&dir);
    let web: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: reaper\n    \
             static_configs:\n      - targets: ['{}']\n",
            daemon.metrics
        ),
    )
    .unwrap();
    let log = dir.join("prometheus.log");
    let mut prometheus = Running::new(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus"),
        "prometheus",
    );
    // Scrapes happen every second; startup of an empty TSDB takes a few.
    let deadline = Instant::now() + Duration::from_secs(60);
    let processes = loop {
        if let Some(status) = prometheus.exited() {
            panic!(
                "prometheus exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let (status, body) = http_get(web, "/api/v1/query?query=reaper_processes");
        if status == 200 {
            let v: Value = serde_json::from_str(&body).expect("query API answers JSON");
            if let Some(value) = v["data"]["result"][0]["value"][1].as_str() {
                break value.parse::<f64>().expect("a number");
            }
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never had reaper_processes; last answer {status} {body}; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(processes > 0.0, "reaper_processes = {processes}");
    let (_, up) = http_get(web, "/api/v1/query?query=up%7Bjob%3D%22reaper%22%7D");
    assert!(up.contains("\"1\""), "the scrape target is up: {up}");
    prometheus.stop(Signal::SIGTERM);
    drop(daemon);
}

/// A minimal HTTP/1.1 GET on loopback (test-only; the daemon's side is a real server).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, DEADLINE) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(DEADLINE));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = match text.split_once("\r\n\r\n") {
        Some((head, body))
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked") =>
        {
            dechunk(body)
        }
        Some((_, body)) => body.to_owned(),
        None => String::new(),
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// --- configuration reload ----------------------------------------------------------------

fn stats_of(daemon: &Daemon) -> Value {
    let out = Command::new(reaper_bin())
        .args(["stats", "--json", "--socket", daemon.socket_arg()])
        .output()
        .expect("reaper stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

#[test]
fn sighup_reloads_a_good_config_and_keeps_the_old_one_on_a_bad_one() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("reload");
    let config = dir.join("reaper.toml");
    let write = |text: &str| {
        std::fs::write(&config, text).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let rule =
        |name: &str| format!("[[rule]]\nname = \"{name}\"\ncomm = [\"never-matches-{name}\"]\n");
    write(&rule("first"));
    let mut daemon = start_daemon_with(&dir, &["--config", config.to_str().unwrap()]);
    assert_eq!(stats_of(&daemon)["rules"], serde_json::json!(["first"]));

    write(&format!("idle_timeout = \"1h\"\n{}", rule("second")));
    kill(daemon.process.pid(), Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while stats_of(&daemon)["rules"] != serde_json::json!(["second"]) {
        assert!(
            Instant::now() < deadline,
            "not reloaded; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(POLL);
    }

    write("idle_timeout = \"soon\"\n");
    kill(daemon.process.pid(), Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !daemon.log().contains("refusing the new configuration") {
        assert!(
            Instant::now() < deadline,
            "bad config not refused; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(POLL);
    }
    assert!(
        daemon.log().contains("idle_timeout"),
        "the refusal names the key"
    );
    assert_eq!(
        stats_of(&daemon)["rules"],
        serde_json::json!(["second"]),
        "the old config stays"
    );
    assert!(daemon.process.exited().is_none(), "still running");
}

/// CAP_DAC_READ_SEARCH 2, CAP_KILL 5, CAP_SYS_PTRACE 19, CAP_BPF 39: what an enforcing daemon
/// keeps (every mode reads other users' /proc/PID/fd links and exe; only enforcing signals).
const ENFORCING_CAPS: u64 = (1 << 2) | (1 << 5) | (1 << 19) | (1u64 << 39);
/// A dry run never signals: no CAP_KILL.
const DRY_RUN_CAPS: u64 = ENFORCING_CAPS & !(1 << 5);

/// Every thread of `pid` holds exactly `kept` (effective, permitted, bounding), nothing
/// inheritable or ambient, under no_new_privs. Capabilities and no_new_privs are per thread:
/// tokio's workers and blocking threads (which serve the sockets and parse /proc) as much as
/// the main one.
fn assert_every_thread_keeps(pid: u32, kept: u64, mode: &str) {
    let threads = thread_statuses(pid);
    let names: Vec<&str> = threads
        .iter()
        .filter_map(|(_, s)| status_field(s, "Name"))
        .collect();
    // Main, two workers, and the blocking thread that ran the start-up /proc scan.
    assert!(
        threads.len() >= 3,
        "{mode}: expected the runtime's threads too: {names:?}"
    );
    assert!(
        names.contains(&"tokio-rt-worker"),
        "{mode}: no worker thread among {names:?}"
    );
    for (tid, status) in &threads {
        let name = status_field(status, "Name").unwrap_or("?");
        let what = format!("{mode}: thread {tid} ({name}) of the daemon");
        assert_eq!(
            status_mask(status, "CapEff"),
            Some(kept),
            "{what}: CapEff\n{status}"
        );
        assert_eq!(status_mask(status, "CapPrm"), Some(kept), "{what}: CapPrm");
        assert_eq!(status_mask(status, "CapBnd"), Some(kept), "{what}: CapBnd");
        assert_eq!(status_mask(status, "CapInh"), Some(0), "{what}: CapInh");
        assert_eq!(status_mask(status, "CapAmb"), Some(0), "{what}: CapAmb");
        assert_eq!(
            status_field(status, "NoNewPrivs"),
            Some("1"),
            "{what}: NoNewPrivs"
        );
    }
}

/// The table the daemon keeps by ([`reaper::privileges::KEPT`]) agrees with the bits above.
fn kept_bits(mode: reaper::config::Mode) -> u64 {
    reaper::privileges::kept(mode).fold(0, |bits, k| bits | 1 << k.cap.index())
}

#[test]
fn each_mode_keeps_only_the_capabilities_it_uses_and_a_reload_needing_more_is_refused() {
    use reaper::config::Mode;
    assert_eq!(kept_bits(Mode::Enforce), ENFORCING_CAPS);
    assert_eq!(kept_bits(Mode::DryRun), DRY_RUN_CAPS);
    let rule = "[[rule]]\nname = \"never\"\ncomm = [\"never-matches-caps\"]\n";
    for (mode, head, kept) in [
        ("enforce", "mode = \"enforce\"\n", ENFORCING_CAPS),
        (
            "enforce, proc-io",
            "mode = \"enforce\"\nactivity_source = \"proc-io\"\n",
            ENFORCING_CAPS,
        ),
        ("dry-run", "mode = \"dry-run\"\n", DRY_RUN_CAPS),
    ] {
        let dir = TempDir::new("caps-mode");
        let config = dir.join("reaper.toml");
        let write = |text: &str| {
            std::fs::write(&config, text).unwrap();
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(&format!("{head}{rule}"));
        let metrics: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let daemon = Daemon::start(
            &dir,
            "daemon",
            ["--config", config.to_str().unwrap()],
            metrics,
        );
        assert_every_thread_keeps(daemon.process.child.id(), kept, mode);
        let log = daemon.log();
        assert!(
            log.contains("dropped every other capability"),
            "{mode}: {log}"
        );
        assert!(
            log.contains("CAP_BPF (update the watched-process map"),
            "{mode}: the log says what is kept and why: {log}"
        );
        if mode == "dry-run" {
            assert!(
                log.contains("CAP_KILL (needed in mode = "),
                "{mode}: and what is not: {log}"
            );
            // CAP_KILL is gone for good: a reload to enforce is refused, the dry run stays.
            write(&format!("mode = \"enforce\"\n{rule}"));
            kill(daemon.process.pid(), Signal::SIGHUP).unwrap();
            let deadline = Instant::now() + DEADLINE;
            while !daemon.log().contains("refusing the new configuration") {
                assert!(
                    Instant::now() < deadline,
                    "reload to enforce not refused:\n{}",
                    daemon.log()
                );
                std::thread::sleep(POLL);
            }
            let log = daemon.log();
            assert!(
                log.contains("needs CAP_KILL") && log.contains("restart reaper"),
                "{log}"
            );
            assert_eq!(
                stats_of(&daemon)["mode"],
                "DryRun",
                "the running configuration stays"
            );
            assert_every_thread_keeps(
                daemon.process.child.id(),
                kept,
                "dry-run after the refused reload",
            );
        }
    }
}

#[test]
fn the_daemon_keeps_only_the_capabilities_it_needs_and_clients_survive_closed_pipes() {
    let dir = TempDir::new("caps");
    let daemon = start_daemon(&dir);
    let pid = daemon.process.child.id();
    // (The daemon is serving: its runtime is up.)
    assert!(daemon.request("stats").is_some());
    assert_every_thread_keeps(pid, DRY_RUN_CAPS, "dry-run");
    let log = daemon.log();
    assert!(
        log.contains(
            "dropped every other capability and set no_new_privs, before starting any other thread"
        ),
        "{log}"
    );
    assert!(!log.contains("could not drop capabilities"), "{log}");
    // …and it still works: it answers and follows a new process.
    let mut helper = Helper::spawn(&["wait"]);
    let pid = helper.read_pid("pid");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let tree: Value = serde_json::from_slice(
            &Command::new(reaper_bin())
                .args(["tree", "--json", "--socket", daemon.socket_arg()])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        if tree
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"]["pid"] == pid)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the helper never showed up after the drop"
        );
        std::thread::sleep(POLL);
    }
    helper.finish();
    // A client whose reader goes away early ends quietly, without a panic.
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "{} tree --socket {} | head -1",
                reaper_bin().display(),
                daemon.socket_arg()
            ),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
