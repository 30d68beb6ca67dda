//! Memory pressure, for real: a process of the test's own thrashes a working set larger than
//! the memory limit of a cgroup of the test's own, which the kernel's PSI counts as memory
//! stall in that cgroup's cgroup v2 `memory.pressure`; reaper is pointed at that file.
//!
//! The limit is `memory.high` where cgroup v2 has the memory controller (the kernel matrix's
//! systemd machine), else the cgroup v1 memory controller's `memory.limit_in_bytes` (this host
//! mounts v1 for memory, in the hybrid layout; PSI is still accounted per v2 cgroup).
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use reaper::{
    app::PipelineConfig,
    config::{Overrides, parse},
    events::Event,
};
use reaper_tests::{DEADLINE, Harness, Helper, alive, helper_path, scenarios::reaping::kills_for};

/// How long the first reap under pressure may take from the start of the thrashing: the
/// kernel's `some avg10` must climb past the threshold first, and it moves only every 2 s
/// (PSI's averaging period, `PSI_FREQ` in
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/sched/psi.c>) at the rate the disk lets
/// the thrasher stall. Three times what it took here.
const PRESSURE_RAMP: Duration = Duration::from_secs(60);

/// Where the cgroup2 hierarchy is mounted.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("this test needs a cgroup2 hierarchy mounted (for per-cgroup memory.pressure)")
}

/// A memory-limited cgroup of the test's own: its v2 directory (for `memory.pressure`) and the
/// `cgroup.procs` files a process joins to be limited.
struct LimitedCgroup {
    v2: PathBuf,
    v1: Option<PathBuf>,
}

impl LimitedCgroup {
    fn new(limit: u64) -> Self {
        let name = format!("reaper-test-pressure-{}", std::process::id());
        let root = cgroup2_root();
        let v2 = root.join(&name);
        std::fs::create_dir_all(&v2).expect("create a cgroup v2 directory");
        assert!(
            v2.join("memory.pressure").exists(),
            "no memory.pressure in {}: the kernel lacks PSI",
            v2.display()
        );
        let v2_memory = std::fs::read_to_string(root.join("cgroup.controllers"))
            .unwrap_or_default()
            .contains("memory");
        if v2_memory {
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
            std::fs::write(v2.join("memory.high"), limit.to_string()).expect("set memory.high");
            return Self { v2, v1: None };
        }
        let v1 = Path::new("/sys/fs/cgroup/memory").join(&name);
        std::fs::create_dir_all(&v1).expect(
            "cgroup v2 has no memory controller and cgroup v1's memory controller is not at /sys/fs/cgroup/memory",
        );
        std::fs::write(v1.join("memory.limit_in_bytes"), limit.to_string())
            .expect("set the v1 memory limit");
        Self { v2, v1: Some(v1) }
    }

    fn procs(&self) -> Vec<String> {
        std::iter::once(&self.v2)
            .chain(&self.v1)
            .map(|d| d.join("cgroup.procs").display().to_string())
            .collect()
    }
}

impl Drop for LimitedCgroup {
    fn drop(&mut self) {
        // Empty by now (the thrasher ended first); rmdir of a cgroup that still has a process
        // fails harmlessly.
        for dir in std::iter::once(&self.v2).chain(&self.v1) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_real_memory_pressure_idle_targets_go_largest_first_and_an_active_one_stays() {
    let cgroup = LimitedCgroup::new(48 << 20);
    let pressure = cgroup.v2.join("memory.pressure");
    let config = reaper_tests::test_config(
        "pressure-claude",
        &[
            ("idle_timeout", "\"10m\""),
            ("max_kills_per_minute", "100"),
            ("reconcile_interval", "\"1h\""),
            ("memory_pressure", "true"),
            ("memory_pressure_some_avg10", "5.0"),
            ("memory_available_percent", "0.0"),
            ("memory_pressure_min_idle", "\"1s\""),
        ],
        &format!(
            "memory_pressure_file = {:?}",
            pressure.display().to_string()
        ),
        &[reaper_tests::agent_comm("fp")],
    );
    let config = parse(&config, "test", &Overrides::default()).expect("test config");
    let mut h = Harness::start_with(PipelineConfig::new(config)).await;

    // Three leaked CLIs of different sizes, and a larger one in a live conversation.
    let leak = |mb: &str| {
        reaper_tests::agent(
            "fp",
            &["--leak", "--claude-arg", "--rss-mb", "--claude-arg", mb],
        )
    };
    let mut agents: Vec<Helper> = ["40", "120", "80"].into_iter().map(leak).collect();
    let leaked: Vec<u32> = agents.iter_mut().map(|a| a.read_pid("claude")).collect();
    let mut chat = reaper_tests::agent(
        "fp",
        &[
            "--chat-every",
            "300",
            "--claude-arg",
            "--rss-mb",
            "--claude-arg",
            "160",
        ],
    );
    let chatting = chat.read_pid("claude");
    for a in agents.iter_mut().chain([&mut chat]) {
        a.read("ready");
    }

    // The working set: 200 MiB of file pages against a 48 MiB limit.
    let file = std::env::temp_dir().join(format!("reaper-test-thrash-{}", std::process::id()));
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&file).expect("create the file to thrash");
        f.write_all(&vec![7u8; 200 << 20]).expect("write it");
        // Written back, so the thrasher can drop its cached pages and fault them in itself.
        f.sync_all().expect("fsync it");
    }
    let mut args = vec!["thrash".to_owned(), file.display().to_string()];
    args.extend(cgroup.procs());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut thrasher = Helper::spawn_program(&helper_path(), &args);
    thrasher.read_pid("pid");
    let started = Instant::now();

    // Largest first, one at a time: 120, 80, then 40 MiB. The first waits for the kernel's
    // avg10 to cross 5 %: it moves every 2 s, averaged over 10 s, so how soon depends on how
    // fast the disk serves the thrasher (13–18 s here, 17.6 s in a CI run): PRESSURE_RAMP. The
    // others follow one per 2 s tick.
    let mut order = Vec::new();
    while order.len() < leaked.len() {
        let within = if order.is_empty() {
            PRESSURE_RAMP
        } else {
            DEADLINE
        };
        let pid = h
            .try_wait_event_within(within, "the leaked CLIs' exits", |e| match e {
                Event::Exit { id, .. } if leaked.contains(&id.pid) => Some(id.pid),
                _ => None,
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        order.push(pid);
    }
    let took = started.elapsed();
    let reading = std::fs::read_to_string(&pressure).unwrap_or_default();
    eprintln!(
        "pressure reaped {order:?} within {took:?} of the thrashing ({})",
        reading.lines().next().unwrap_or("")
    );
    assert_eq!(
        order,
        [leaked[1], leaked[2], leaked[0]],
        "largest RSS first"
    );
    assert!(alive(chatting), "the active CLI was reaped under pressure");
    // The last kill is counted when its reap task reports, a moment after the exit event.
    reaper_tests::scenarios::stats_until(&h, "three kills by pressure counted", |s| {
        kills_for(s, "memory_pressure") == 3
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    drop(thrasher);
    let _ = std::fs::remove_file(&file);
    // Still there once the thrashing is over.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert!(alive(chatting));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    chat.finish();
}
