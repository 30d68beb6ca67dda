//! Runs inside the systemd machine of `cargo xtask vm-test` (a Debian bookworm root booted by
//! systemd in QEMU): installs the .deb `cargo xtask dist` built (`dpkg -i`, which enables and
//! starts reaper.service the Debian way), checks that the unit, with its whole sandbox, runs the
//! daemon as intended, then removes and purges the package. Prints one `vm-check` line per check
//! (the format `vm-runner` uses; xtask parses both) and `vm-result: N passed, M failed`. Its own
//! unit powers the machine off afterwards.
//!
//! It signals nothing but what it starts itself (one `sleep`), and asks systemd to reload, stop
//! and restart the service.
use std::{
    io::{Read as _, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// How long a check waits for its condition (the machine is emulated: slow).
const WAIT: Duration = Duration::from_secs(60);
const UNIT: &str = "reaper.service";
const METRICS: &str = "127.0.0.1:9847";
const SOCKET: &str = "/run/reaper/reaper.sock";
const REAPER: &str = "/usr/bin/reaper";
/// Where xtask put the package in the machine.
const DEB: &str = "/root/reaper.deb";
const CONFIG: &str = "/etc/reaper/reaper.toml";
/// The unit's CapabilityBoundingSet; the daemon keeps a subset of it after attaching.
const BOUNDING: [&str; 5] = [
    "cap_bpf",
    "cap_perfmon",
    "cap_kill",
    "cap_sys_ptrace",
    "cap_dac_read_search",
];

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A check: Ok(what it saw) or the reason it failed.
type Check = fn() -> anyhow::Result<String>;

fn main() {
    let checks: [(&str, Check); 11] = [
        ("deb_installs_and_enables", deb_installs_and_enables),
        ("service_active", service_active),
        ("service_privileges", service_privileges),
        ("service_http", service_http),
        ("service_follows_processes", service_follows_processes),
        ("service_watchdog", service_watchdog),
        ("service_reloads", service_reloads),
        ("service_stops_cleanly", service_stops_cleanly),
        // After the stop: shutdown's lines are checked too.
        ("service_journal_clean", service_journal_clean),
        ("service_bad_config_exits_78", service_bad_config_exits_78),
        ("deb_removes_and_purges", deb_removes_and_purges),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, check) in checks {
        let started = Instant::now();
        let result = check();
        let secs = started.elapsed().as_secs_f64();
        match result {
            Ok(detail) => {
                passed += 1;
                say(&format!("vm-check {name}: PASS [{secs:.1}s] {detail}"));
            }
            Err(err) => {
                failed += 1;
                say(&format!("vm-check {name}: FAIL [{secs:.1}s] {err:#}"));
            }
        }
    }
    say(&format!("vm-result: {passed} passed, {failed} failed"));
    std::process::exit(i32::from(failed > 0));
}

/// `program args…`: its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn show(property: &str) -> anyhow::Result<String> {
    Ok(run(
        "systemctl",
        &["show", "--property", property, "--value", UNIT],
    )?
    .trim()
    .to_owned())
}

/// Polls `check` until it returns Some or the deadline passes.
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = check() {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The unit started (its ExecStartPre `reaper check` passed) and its socket answers.
fn service_active() -> anyhow::Result<String> {
    let state = wait_for("reaper.service to be active and serving", || {
        let state = show("ActiveState").ok()?;
        if state == "failed" {
            return Some(state);
        }
        (state == "active" && std::path::Path::new(SOCKET).exists()).then_some(state)
    })?;
    ensure!(
        state == "active",
        "reaper.service failed: {}",
        run("journalctl", &["--no-pager", "-u", UNIT, "-n", "30"]).unwrap_or_default()
    );
    // Type=notify: active only once the daemon said READY=1, with its status line.
    let status = show("StatusText")?;
    ensure!(
        status.starts_with("following every process"),
        "StatusText {status:?}"
    );
    let version = run("systemctl", &["--version"])?;
    Ok(format!(
        "active (READY=1, status {status:?}), main pid {}, under {}",
        show("MainPID")?,
        version.lines().next().unwrap_or("systemd")
    ))
}

/// `dpkg -i`: the postinst enables the unit and starts it (deb-systemd-helper,
/// deb-systemd-invoke), the conffile is registered.
fn deb_installs_and_enables() -> anyhow::Result<String> {
    let out = run("dpkg", &["-i", DEB])?;
    let enabled = run("systemctl", &["is-enabled", UNIT]).unwrap_or_default();
    ensure!(
        enabled.trim() == "enabled",
        "is-enabled: {enabled:?}; dpkg said:\n{out}"
    );
    let conffiles = run("dpkg-query", &["-W", "-f=${Conffiles}", "reaper"])?;
    ensure!(conffiles.contains(CONFIG), "conffiles: {conffiles:?}");
    let unit = run(
        "systemctl",
        &["show", "--property", "FragmentPath", "--value", UNIT],
    )?;
    ensure!(
        unit.trim() == "/lib/systemd/system/reaper.service",
        "FragmentPath {unit:?}"
    );
    let version = run(REAPER, &["--version"])?;
    Ok(format!(
        "installed {}, enabled, unit {}",
        version.trim(),
        unit.trim()
    ))
}

/// The daemon pets the watchdog (WatchdogSec=30s: every 15 s) while healthy: systemd's record
/// of the last ping moves on.
fn service_watchdog() -> anyhow::Result<String> {
    let usec = show("WatchdogUSec")?;
    ensure!(usec == "30s", "WatchdogUSec {usec:?}");
    let first = show("WatchdogTimestampMonotonic")?;
    let next = wait_for("a new watchdog ping", || {
        let now = show("WatchdogTimestampMonotonic").ok()?;
        (now != first).then_some(now)
    })?;
    Ok(format!(
        "WatchdogUSec {usec}; last ping moved from {first} to {next} (µs since boot)"
    ))
}

/// The metric reaper_config_last_reload_success_timestamp_seconds.
fn reload_time() -> anyhow::Result<f64> {
    let (_, body) = http_get("/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("reaper_config_last_reload_success_timestamp_seconds "))
        .context("no reload timestamp in /metrics")?
        .trim()
        .parse()
        .context("the reload timestamp")
}

/// `systemctl reload`: SIGHUP, RELOADING=1 then READY=1 (systemd waits for both), the new
/// configuration applied and counted.
fn service_reloads() -> anyhow::Result<String> {
    let before = reload_time()?;
    let pid = show("MainPID")?;
    run("systemctl", &["reload", UNIT])?;
    let after = wait_for("a newer reload timestamp", || {
        reload_time().ok().filter(|t| *t > before)
    })?;
    let log = wait_for("\"configuration reloaded\" in the journal", || {
        let log = run("journalctl", &["--no-pager", "-o", "cat", "-u", UNIT]).ok()?;
        log.contains("configuration reloaded").then_some(log)
    })?;
    let _ = log;
    ensure!(
        show("ActiveState")? == "active" && show("MainPID")? == pid,
        "not the same running daemon after reload"
    );
    Ok(format!(
        "reloaded (timestamp {before} → {after}), same main pid {pid}"
    ))
}

/// A configuration that cannot be used: the daemon exits 78 (EX_CONFIG), systemd does not
/// restart it (RestartPreventExitStatus=78), and the reason is in the journal at error
/// priority. The good file is put back and the unit started again.
fn service_bad_config_exits_78() -> anyhow::Result<String> {
    let good = std::fs::read_to_string(CONFIG).context("reading the config")?;
    std::fs::write(CONFIG, format!("{good}\nno_such_key = 1\n"))?;
    let started = run("systemctl", &["start", UNIT]);
    let result = (|| -> anyhow::Result<String> {
        ensure!(
            started.is_err(),
            "systemctl start succeeded with a bad config"
        );
        let status = wait_for("the failed start", || {
            let status = show("ExecMainStatus").ok()?;
            (status != "0").then_some(status)
        })?;
        ensure!(
            status == "78",
            "ExecMainStatus {status} (the failing command may be `reaper check`)"
        );
        // Restart=on-failure would try again after RestartSec=5s: give it twice that.
        std::thread::sleep(Duration::from_secs(10));
        let (state, restarts) = (show("ActiveState")?, show("NRestarts")?);
        ensure!(
            state == "failed" && restarts == "0",
            "ActiveState={state} NRestarts={restarts}"
        );
        let errors = run(
            "journalctl",
            &["--no-pager", "-o", "cat", "-p", "err", "-u", UNIT],
        )?;
        ensure!(
            errors.contains("no_such_key"),
            "journalctl -p err shows no reason:\n{errors}"
        );
        Ok(format!(
            "exit 78, not restarted, `journalctl -p err` shows: {}",
            errors
                .lines()
                .find(|l| l.contains("no_such_key"))
                .unwrap_or_default()
        ))
    })();
    std::fs::write(CONFIG, good)?;
    let _ = run("systemctl", &["reset-failed", UNIT]);
    result
}

/// `dpkg -r` stops the service and removes the program and the unit but keeps the edited
/// conffile; `dpkg -P` removes it and the enablement.
fn deb_removes_and_purges() -> anyhow::Result<String> {
    run("systemctl", &["start", UNIT])?;
    wait_for("reaper.service active again", || {
        (show("ActiveState").ok()? == "active").then_some(())
    })?;
    run("dpkg", &["-r", "reaper"])?;
    let state = show("ActiveState")?;
    ensure!(state == "inactive", "after dpkg -r: ActiveState={state}");
    for gone in [REAPER, "/lib/systemd/system/reaper.service"] {
        ensure!(
            !std::path::Path::new(gone).exists(),
            "{gone} is still there after dpkg -r"
        );
    }
    ensure!(
        std::path::Path::new(CONFIG).exists(),
        "the conffile went with dpkg -r"
    );
    run("dpkg", &["-P", "reaper"])?;
    ensure!(
        !std::path::Path::new(CONFIG).exists(),
        "{CONFIG} is still there after dpkg -P"
    );
    let wants = "/etc/systemd/system/multi-user.target.wants/reaper.service";
    ensure!(
        std::fs::symlink_metadata(wants).is_err(),
        "{wants} is still there after dpkg -P"
    );
    Ok("dpkg -r stopped it and removed binary and unit, kept the conffile; dpkg -P removed the rest".into())
}

/// The daemon under the unit's sandbox, on every one of its threads (capabilities and
/// no_new_privs are per thread): no_new_privs, and capabilities within the unit's bounding set,
/// exactly what it keeps at run time (CAP_KILL, CAP_BPF, …).
fn service_privileges() -> anyhow::Result<String> {
    let pid = show("MainPID")?;
    let names = |mask: u64| -> Vec<String> {
        let mut names: Vec<String> = caps::all()
            .into_iter()
            .filter(|c| mask & (1u64 << c.index()) != 0)
            .map(|c| c.to_string().to_lowercase())
            .collect();
        names.sort();
        names
    };
    // Exactly what the daemon says it keeps once attached in the installed config's mode
    // (reaper::privileges::KEPT).
    let config = reaper::config::Config::load(std::path::Path::new(CONFIG), &Default::default())?;
    let mut kept: Vec<String> = reaper::privileges::kept(config.mode)
        .map(|k| k.cap.to_string().to_lowercase())
        .collect();
    kept.sort();
    let threads = reaper_tests::thread_statuses(pid.parse().context("MainPID")?);
    ensure!(
        threads.len() >= 3,
        "only {} thread(s) in /proc/{pid}/task: no runtime?",
        threads.len()
    );
    let mut bounding = Vec::new();
    for (tid, status) in &threads {
        let name = reaper_tests::status_field(status, "Name").unwrap_or("?");
        let field = |field: &str| -> anyhow::Result<u64> {
            reaper_tests::status_mask(status, field)
                .with_context(|| format!("no {field} for thread {tid} ({name})"))
        };
        let nnp = reaper_tests::status_field(status, "NoNewPrivs");
        ensure!(
            nnp == Some("1"),
            "thread {tid} ({name}): NoNewPrivs is {nnp:?}"
        );
        bounding = names(field("CapBnd")?);
        for cap in &bounding {
            ensure!(
                BOUNDING.contains(&cap.as_str()),
                "thread {tid} ({name}): {cap} is in the bounding set {bounding:?}"
            );
        }
        let effective = names(field("CapEff")?);
        let permitted = names(field("CapPrm")?);
        ensure!(
            effective == kept,
            "thread {tid} ({name}): effective {effective:?}, expected {kept:?}"
        );
        ensure!(
            permitted == kept,
            "thread {tid} ({name}): permitted {permitted:?}, expected {kept:?}"
        );
    }
    Ok(format!(
        "all {} threads: no_new_privs, effective = permitted = {kept:?}, bounding {bounding:?}",
        threads.len()
    ))
}

/// `GET path` on the metrics address: (status line, body).
fn http_get(path: &str) -> anyhow::Result<(String, String)> {
    let mut stream =
        std::net::TcpStream::connect(METRICS).context("connecting to the metrics endpoint")?;
    stream.set_read_timeout(Some(WAIT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {METRICS}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("an HTTP response")?;
    Ok((
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    ))
}

/// /healthz says ok and /metrics counts the host's processes. (The port is bound before the
/// pipeline starts, so /healthz may say 503 for a moment first.)
fn service_http() -> anyhow::Result<String> {
    let mut last = String::new();
    let healthy = wait_for("/healthz to answer 200", || match http_get("/healthz") {
        Ok((status, _)) if status.contains(" 200 ") => Some(()),
        Ok((status, body)) => {
            last = format!("{status} {body}");
            None
        }
        Err(err) => {
            last = format!("{err:#}");
            None
        }
    });
    healthy.with_context(|| format!("/healthz: {last}"))?;
    let (status, body) = http_get("/metrics")?;
    ensure!(status.contains(" 200 "), "/metrics: {status}");
    let processes: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("reaper_processes "))
        .context("no reaper_processes sample")?
        .trim()
        .parse()?;
    ensure!(processes > 0.0, "reaper_processes {processes}");
    Ok(format!(
        "/healthz 200, /metrics 200 with reaper_processes {processes}"
    ))
}

/// `reaper stats` over the unit's socket.
fn stats() -> anyhow::Result<serde_json::Value> {
    let stats = run(REAPER, &["stats", "--json", "--socket", SOCKET])?;
    serde_json::from_str(&stats).context("`reaper stats` JSON")
}

/// A process started now shows in `reaper explain` over the unit's socket, with its argv, and
/// not through a `/proc` reconcile: the probes run and the tree follows the host under the
/// sandbox.
fn service_follows_processes() -> anyhow::Result<String> {
    let reconciles = stats()?["reconciles"].as_u64().context("reconciles")?;
    let mut child = Command::new("sleep")
        .arg("123.456")
        .stdin(Stdio::null())
        .spawn()
        .context("starting sleep")?;
    let pid = child.id().to_string();
    let shown = wait_for("the new process in `reaper explain`", || {
        let out = run(REAPER, &["explain", &pid, "--socket", SOCKET]).ok()?;
        out.contains("sleep 123.456").then_some(out)
    });
    let _ = child.kill();
    let _ = child.wait();
    let shown = shown?;
    let stats = stats()?;
    let events = stats["events_total"].as_u64().context("events_total")?;
    ensure!(events > 0, "no events counted: {stats}");
    ensure!(
        stats["reconciles"].as_u64() == Some(reconciles),
        "a /proc reconcile ran meanwhile, so the tree may have learnt of it from /proc: {stats}"
    );
    Ok(format!(
        "pid {pid} seen: {}; {events} events so far",
        shown.lines().next().unwrap_or_default()
    ))
}

/// The journal shows the start-up lines and no warning or error from the daemon (a sandbox that
/// refuses a syscall shows up here as a logged EPERM).
fn service_journal_clean() -> anyhow::Result<String> {
    let log = wait_for("\"process tree ready\" in the journal", || {
        let log = run("journalctl", &["--no-pager", "-o", "cat", "-u", UNIT]).ok()?;
        log.contains("process tree ready").then_some(log)
    })?;
    for line in log.lines() {
        say(&format!("vm-journal: {line}"));
    }
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    ensure!(bad.is_empty(), "the daemon logged:\n{}", bad.join("\n"));
    Ok(format!(
        "{} journal lines, none a warning or an error",
        log.lines().count()
    ))
}

/// `systemctl stop`: SIGTERM, a clean exit (status 0), the runtime directory removed.
fn service_stops_cleanly() -> anyhow::Result<String> {
    let started = Instant::now();
    run("systemctl", &["stop", UNIT])?;
    let took = started.elapsed().as_secs_f64();
    let (state, result, status) = (
        show("ActiveState")?,
        show("Result")?,
        show("ExecMainStatus")?,
    );
    ensure!(
        state == "inactive" && result == "success" && status == "0",
        "after stop: ActiveState={state} Result={result} ExecMainStatus={status}"
    );
    ensure!(
        !std::path::Path::new("/run/reaper").exists(),
        "/run/reaper is still there"
    );
    let log = run("journalctl", &["--no-pager", "-o", "cat", "-u", UNIT])?;
    ensure!(
        log.lines()
            .any(|l| l.trim_end().ends_with("INFO reaper: stopped")),
        "no final `stopped` line in the journal"
    );
    Ok(format!(
        "stopped in {took:.1}s, exit status 0, /run/reaper removed"
    ))
}
