//! The activity watch when its map fills. Targets and their descendants are tracked in the
//! kernel's `WATCHED` map (sized from `kernel.pid_max`, capped); a descendant forked while it is
//! full goes unwatched, and its socket bytes uncounted. That must never be silent: it is
//! counted (`reaper_watch_failures_total`) and flagged on the target, whose idle verdict can no
//! longer be trusted. Here the map is made tiny so a handful of forks fill it.
use reaper::probes::{ProbeOptions, Probes, per_pid_entries};
use reaper_tests::Helper;

fn attach(per_pid: Option<u32>) -> Probes {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests load eBPF programs: run them as root (cargo xtask test)"
    );
    Probes::attach(ProbeOptions {
        per_pid_entries: per_pid,
        ..ProbeOptions::default()
    })
    .expect("attach the probes")
}

#[test]
fn a_full_watch_map_is_counted_and_flags_the_target() {
    let mut probes = attach(Some(4));
    assert_eq!(probes.watched_capacity().expect("map info"), 4);

    let mut helper = Helper::spawn(&["children-on-cue", "6"]);
    let target = helper.read_pid("pid");
    probes.watch(target, target).expect("room for the target");
    assert!(!probes.watch_failed(target));
    assert_eq!(probes.watch_failures(), 0);

    helper.send("go");
    let forked: usize = helper.read("forked").parse().expect("a count");
    let children: Vec<u32> = helper.values["child"]
        .iter()
        .map(|pid| pid.parse().expect("a pid"))
        .collect();
    assert_eq!((forked, children.len()), (6, 6));
    // The fork tracepoint runs in fork() before it returns to the parent, so every insert
    // was tried before the helper printed the pids. Four slots: the target and its first
    // three children; the last three were refused.
    assert_eq!(probes.watch_failures(), 3, "kernel-side refusals");
    assert!(
        probes.watch_failed(target),
        "the target's activity is incomplete"
    );

    // User space's own watch fails the same way, and says so.
    let err = probes
        .watch(children[5], target)
        .expect_err("WATCHED is full");
    assert_eq!(err.map, "WATCHED");
    assert_eq!(probes.watch_failures(), 4, "plus one user-side failure");

    // Another target whose own watch failed is flagged too; unwatching clears both.
    let other = std::process::id();
    assert!(probes.watch(other, other).is_err());
    assert!(probes.watch_failed(other));
    probes.unwatch(other, []);
    assert!(!probes.watch_failed(other));
    probes.unwatch(target, children);
    assert!(!probes.watch_failed(target));
    assert_eq!(probes.watch_failures(), 5, "the count only grows");
}

/// Exits free their `WATCHED` entries. The exit program looks a tgid up only when its filter
/// says it may be watched (a byte per tgid set by the fork program, a bit per tgid set by user
/// space): with room for two entries (the target and one more), every process after the first
/// would be refused if a filter hid one exit from the map.
#[test]
fn exits_of_watched_processes_free_their_entries() {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::process::{Command, Stdio};

    let mut probes = attach(Some(2));
    let mut shell = Command::new("sh")
        .args([
            "-c",
            "read go; for i in 1 2 3 4 5 6 7 8; do /bin/true; done; echo done; read end; exit 0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let target = shell.id();
    probes.watch(target, target).expect("room for the target");

    // Children of a watched process, inserted by the fork program, one at a time.
    let mut stdin = shell.stdin.take().expect("piped stdin");
    writeln!(stdin, "go").expect("cue the shell");
    let mut line = String::new();
    BufReader::new(shell.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("the shell's report");
    assert_eq!(line.trim(), "done");
    assert_eq!(
        probes.watch_failures(),
        0,
        "each child's exit freed its entry before the next fork"
    );

    // Processes user space watched: the exit program removes them on exit (before wait(2)
    // returns), so each watch finds room.
    for round in 0..4 {
        let mut cat = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn cat");
        probes
            .watch(cat.id(), target)
            .unwrap_or_else(|err| panic!("round {round}: the last exit freed its entry: {err}"));
        drop(cat.stdin.take());
        assert!(cat.wait().expect("wait for cat").success());
    }
    assert_eq!(probes.watch_failures(), 0);

    drop(stdin);
    assert!(shell.wait().expect("wait for sh").success());
    probes.unwatch(target, []);
}

/// A watched member's exit clears the bit user space set for it in `WATCHED_BY_USER` (the exit
/// program removed its `WATCHED` entry but cannot clear that bit): a stale bit would cost the
/// kernel a hash lookup for every later process with that pid. A pid `WATCHED` still holds
/// keeps its bit.
#[test]
fn an_exited_member_loses_its_filter_bit() {
    use std::process::{Command, Stdio};

    let mut probes = attach(None);
    let target = std::process::id();
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn cat");
    let pid = cat.id();
    probes.watch(pid, target).expect("room for cat");
    assert!(probes.user_filter(pid), "set before the insert");

    // Still in WATCHED (alive): the bit stays.
    probes.exited(pid);
    assert!(probes.user_filter(pid), "WATCHED still holds it");

    drop(cat.stdin.take());
    assert!(cat.wait().expect("wait for cat").success());
    // The exit program removed the entry before wait(2) returned.
    probes.exited(pid);
    assert!(
        !probes.user_filter(pid),
        "cleared once WATCHED no longer holds it"
    );
    probes.unwatch(target, []);
}

/// A process that execs under a watched name is watched from its exec on: the exec program
/// looks its comm up in `WATCH_NAMES` when the name filter (bits user space sets) says it may
/// be there. Seen through the fork program: with room for one entry (the named process), its
/// child's insert is refused and counted, which happens only if the named process was watched.
#[test]
fn a_process_execing_under_a_watched_name_is_watched() {
    let mut probes = attach(Some(1));
    // A copy of sh under a name nothing else on the host runs.
    let dir = std::env::temp_dir().join(format!("reaper-watch-name-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let named = dir.join("rpr-watch-nm");
    std::fs::copy("/bin/sh", &named).expect("copy /bin/sh");
    probes.set_watch_names(["some-other", "rpr-watch-nm"]);

    let status = std::process::Command::new(&named)
        .args(["-c", "/bin/true; exit 0"])
        .status()
        .expect("run the named shell");
    assert!(status.success());
    assert_eq!(
        probes.watch_failures(),
        1,
        "the named shell was watched, so its child's insert was tried (and refused)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn per_pid_maps_are_sized_from_pid_max() {
    let pid_max: u32 = std::fs::read_to_string(reaper::probes::PID_MAX_PATH)
        .expect("kernel.pid_max")
        .trim()
        .parse()
        .expect("a number");
    let probes = attach(None);
    let capacity = probes.watched_capacity().expect("map info");
    assert_eq!(capacity, per_pid_entries(Some(pid_max)));
    assert_eq!(capacity, pid_max.min(reaper::probes::PER_PID_MAX_ENTRIES));
}

/// Lines written by a `tracing` subscriber, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The kernel side reports a refused watch through aya-log into the daemon's `tracing` log:
/// once, however many refusals (one line per kind of failure a minute).
///
/// A current-thread runtime: the task forwarding the log lines runs only when the test awaits,
/// so every refusal is in the log ring buffer before it first reads, and one read drains them
/// all. Three refusals logged without the rate limit would show as three lines.
#[tokio::test(flavor = "current_thread")]
async fn a_refused_watch_is_logged_once_through_aya_log() {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let log = Captured::default();
    let _subscriber = tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .finish()
        .set_default();

    let mut probes = attach(Some(4));
    let mut helper = Helper::spawn(&["children-on-cue", "6"]);
    let target = helper.read_pid("pid");
    probes.watch(target, target).expect("room for the target");
    helper.send("go");
    helper.read("forked");
    let first_refused = &helper.values["child"][3];
    assert_eq!(probes.watch_failures(), 3);

    let deadline = std::time::Instant::now() + reaper_tests::DEADLINE;
    let needle = "the watch map is full";
    while !log.text().contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} line in the log after {:?}:\n{}",
            reaper_tests::DEADLINE,
            log.text()
        );
        tokio::time::sleep(reaper_tests::POLL).await;
    }
    let text = log.text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "one line for three refusals:\n{text}");
    let line = lines[0];
    assert!(
        line.contains("WARN") && line.contains("reaper::ebpf"),
        "{line}"
    );
    assert!(
        line.contains(&format!("pid {first_refused} of target {target}")),
        "{line}"
    );
}
