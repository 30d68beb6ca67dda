//! Agent sessions: a target and every process that descends from it, by lineage (recorded at
//! fork, kept when a process is re-parented to init or a subreaper), and what is left of it
//! once the target is gone. Pure: the detector feeds it facts read from the host.
use serde::{Deserialize, Serialize};

use crate::config::Leftovers;

/// How a process's stdin and stdout are connected, and whether it leads its own session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Connections {
    /// `/proc/PID/fd/0`: `socket:[…]`, `pipe:[…]`, `/dev/null`, a path.
    pub stdin: Option<String>,
    /// `/proc/PID/fd/1`.
    pub stdout: Option<String>,
    /// Its session id is its pid (`setsid()`): it detached from the agent's session.
    pub session_leader: bool,
    /// Its real uid now (a `setuid()` without exec shows in no event).
    #[serde(default)]
    pub uid: Option<u32>,
}

impl Connections {
    fn connected(fd: &Option<String>) -> bool {
        fd.as_deref()
            .is_some_and(|f| f.starts_with("pipe:") || f.starts_with("socket:"))
    }
}

/// What a descendant of a target is, as far as the kernel shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// stdin or stdout is a pipe or socket, in the agent's session: a stdio MCP server (also
    /// behind a wrapper), connected to the agent.
    StdioServer,
    /// Leads a session of its own: a tool (the Bash tool runs `bash` after `setsid`), a
    /// background task, a dev server the user asked for. Detached on purpose.
    Tool,
    /// Anything else.
    Other,
}

impl Kind {
    pub(crate) const ALL: [Kind; 3] = [Self::StdioServer, Self::Tool, Self::Other];

    pub(crate) fn of(c: &Connections) -> Self {
        if c.session_leader {
            Self::Tool
        } else if Connections::connected(&c.stdin) || Connections::connected(&c.stdout) {
            Self::StdioServer
        } else {
            Self::Other
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::StdioServer => "stdio_server",
            Self::Tool => "tool",
            Self::Other => "other",
        }
    }
}

/// Whether a leftover of this kind is reaped under a rule's policy, and why (or why not).
pub(crate) fn reapable(policy: Leftovers, kind: Kind) -> Result<(), &'static str> {
    match (policy, kind) {
        (Leftovers::None, _) => Err("its rule reaps no leftovers (leftovers = \"none\")"),
        (Leftovers::All, _) | (Leftovers::Connected, Kind::StdioServer) => Ok(()),
        (Leftovers::Connected, _) => Err(
            "it detached on purpose (a session of its own, or no pipe or socket on its stdio): \
             reported, not reaped (a rule reaps it with leftovers = \"all\")",
        ),
    }
}

/// Live descendants of a session, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KindCounts {
    pub stdio_server: usize,
    pub tool: usize,
    pub other: usize,
}

impl KindCounts {
    pub(crate) fn add(&mut self, kind: Kind) {
        match kind {
            Kind::StdioServer => self.stdio_server += 1,
            Kind::Tool => self.tool += 1,
            Kind::Other => self.other += 1,
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.stdio_server + self.tool + self.other
    }
}

/// A session as shown by `reaper sessions`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionView {
    pub target: crate::events::Identity,
    pub comm: String,
    pub rule: String,
    /// active, idle, turn_in_flight, leaked or ended.
    pub state: String,
    pub uid: u32,
    /// The agent daemon that started it.
    pub parent: u32,
    pub parent_comm: String,
    /// Seconds since its last activity (live) or since it ended.
    pub quiet_secs: f64,
    pub(crate) descendants: KindCounts,
    /// Descendants still alive after the target ended.
    pub leftovers: usize,
    /// RSS of the target (if alive) and its live descendants.
    pub rss_bytes: u64,
    /// Where the target runs (unit, container, pod); for an ended session, where it ran.
    #[serde(default)]
    pub attribution: Attribution,
}

/// Where a process runs, from its `/proc/PID/cgroup`: the systemd unit, the container, the
/// Kubernetes pod. Shown with every kill, so an operator knows whose agent it was.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// The innermost `*.service` or `*.scope` (for a container runtime's scope, its name).
    pub unit: Option<String>,
    /// A container id (64 hex digits: docker, containerd, CRI-O, podman).
    pub container: Option<String>,
    /// A Kubernetes pod uid.
    pub pod: Option<String>,
}

impl Attribution {
    /// A short label for tables: the pod, else the container (12 digits), else the unit.
    pub(crate) fn short(&self) -> String {
        match (&self.pod, &self.container, &self.unit) {
            (Some(pod), _, _) => format!("pod {pod}"),
            (None, Some(c), _) => format!("container {}", &c[..12.min(c.len())]),
            (None, None, Some(unit)) => unit.clone(),
            (None, None, None) => "-".into(),
        }
    }

    /// Reads the text of `/proc/PID/cgroup`: the cgroup v2 line (`0::/…`) unless it is the
    /// root, as in a hybrid layout, where the `name=systemd` line says more.
    pub(crate) fn from_cgroup(text: &str) -> Self {
        let path = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .filter(|p| *p != "/")
            .or_else(|| {
                text.lines()
                    .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
            })
            .unwrap_or("");
        let mut a = Self::default();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if part.ends_with(".service") || part.ends_with(".scope") {
                a.unit = Some(part.to_owned());
            }
            // docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope,
            // or a bare <id> directory (cgroupfs driver).
            let stem = part.trim_end_matches(".scope");
            let id = stem.rsplit('-').next().unwrap_or(stem);
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                a.container = Some(id.to_owned());
            }
            // kubepods-burstable-pod<uid with _>.slice, or pod<uid> (cgroupfs driver).
            if let Some(uid) = part
                .trim_end_matches(".slice")
                .rsplit('-')
                .next()
                .and_then(|p| p.strip_prefix("pod"))
                && uid.len() >= 32
            {
                a.pod = Some(uid.replace('_', "-"));
            }
        }
        a
    }
}

/// The fastest fall of MemAvailable, in percent of MemTotal a second, that the pressure check
/// is meant to act on before it crosses the threshold. What it is for fills memory over minutes
/// to hours: a leaked agent CLI holds 170–370 MB and they pile up one per query (public
/// reports: 35 in 24 h, 121 in 6 h). Falling faster than this (160 MB/s on an 8 GB host, an
/// agent CLI every one or two seconds, sustained) is a burst that only the kernel's OOM killer
/// answers in time; a read every second would not either, and PSI, read at every check, rises
/// under it.
const MEM_FALL_PERCENT_PER_SEC: f64 = 2.0;
/// The longest `/proc/meminfo` goes unread, however much memory is available.
const MEMINFO_MAX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(16);

/// How long `/proc/meminfo` may go unread after a reading with MemAvailable at `available`
/// percent of MemTotal (`None`: unknown), with the threshold at `threshold` percent: falling
/// at most [`MEM_FALL_PERCENT_PER_SEC`], it cannot cross the threshold sooner, so a read after
/// this long notices a crossing no later than a read at every check would (give or take one
/// check), and once close to the threshold it is read at every check. The read is worth
/// sparing: every read computes and formats all fifty-odd fields (meminfo_proc_show(),
/// <https://github.com/torvalds/linux/blob/v6.18/fs/proc/meminfo.c>), and `perf` put it at
/// 14 % of an idle daemon's samples when read every second.
pub(crate) fn meminfo_interval(available: Option<f64>, threshold: f64) -> std::time::Duration {
    let headroom = available.map_or(0.0, |a| a - threshold);
    if headroom.is_nan() || headroom <= 0.0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::from_secs_f64(headroom / MEM_FALL_PERCENT_PER_SEC)
        .min(MEMINFO_MAX_INTERVAL)
}

/// One reading of memory pressure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Pressure {
    /// PSI `some avg10`, percent.
    pub some_avg10: Option<f64>,
    /// MemAvailable as a share of MemTotal, percent.
    pub available_percent: Option<f64>,
}

impl Pressure {
    /// Parses a PSI file (`/proc/pressure/memory` or a cgroup's `memory.pressure`) and
    /// `/proc/meminfo`; either may be missing.
    pub(crate) fn parse(psi: Option<&str>, meminfo: Option<&str>) -> Self {
        let some_avg10 = psi.and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("some "))?;
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix("avg10="))?
                .parse()
                .ok()
        });
        let available_percent = meminfo.and_then(|text| {
            let kb = |key: &str| -> Option<f64> {
                text.lines()
                    .find(|l| l.starts_with(key))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            };
            let (total, available) = (kb("MemTotal:")?, kb("MemAvailable:")?);
            (total > 0.0).then(|| available / total * 100.0)
        });
        Self {
            some_avg10,
            available_percent,
        }
    }

    /// Whether this reading says memory is short.
    pub(crate) fn short(&self, mp: &crate::config::MemoryPressure) -> bool {
        self.some_avg10.is_some_and(|p| p >= mp.some_avg10)
            || self
                .available_percent
                .is_some_and(|a| a < mp.available_percent)
    }
}

impl std::fmt::Display for Pressure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.some_avg10 {
            Some(p) => write!(f, "PSI some avg10={p:.2}%")?,
            None => write!(f, "PSI unknown")?,
        }
        match self.available_percent {
            Some(a) => write!(f, ", MemAvailable {a:.1}% of MemTotal"),
            None => write!(f, ", MemAvailable unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_connections() {
        let c = |stdin: &str, stdout: &str, leader| Connections {
            stdin: Some(stdin.into()),
            stdout: Some(stdout.into()),
            session_leader: leader,
            uid: None,
        };
        assert_eq!(
            Kind::of(&c("pipe:[7]", "pipe:[8]", false)),
            Kind::StdioServer
        );
        assert_eq!(
            Kind::of(&c("/dev/null", "socket:[9]", false)),
            Kind::StdioServer
        );
        assert_eq!(
            Kind::of(&c("/dev/null", "/tmp/x/tasks/1.output", true)),
            Kind::Tool
        );
        assert_eq!(
            Kind::of(&c("pipe:[7]", "pipe:[8]", true)),
            Kind::Tool,
            "setsid wins"
        );
        assert_eq!(Kind::of(&c("/dev/null", "/var/log/x", false)), Kind::Other);
        assert!(reapable(Leftovers::Connected, Kind::StdioServer).is_ok());
        assert!(reapable(Leftovers::Connected, Kind::Tool).is_err());
        assert!(reapable(Leftovers::All, Kind::Tool).is_ok());
        assert!(reapable(Leftovers::None, Kind::StdioServer).is_err());
    }

    #[test]
    fn attribution_names_the_unit_the_container_and_the_pod() {
        let a = Attribution::from_cgroup("0::/system.slice/claude-mem.service\n");
        assert_eq!(a.unit.as_deref(), Some("claude-mem.service"));
        assert_eq!((a.container, a.pod), (None, None));
        let id = "4f1c2e3d".repeat(8);
        let k8s = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_4a7b_8c9d_0e1f2a3b4c5d.slice/cri-containerd-{id}.scope\n"
        );
        let a = Attribution::from_cgroup(&k8s);
        assert_eq!(a.container.as_deref(), Some(id.as_str()));
        assert_eq!(
            a.pod.as_deref(),
            Some("1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d")
        );
        // Hybrid (this host's) layout: the name=systemd line.
        let hybrid =
            "4:memory:/x\n1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n0::/\n";
        assert_eq!(
            Attribution::from_cgroup(hybrid).unit.as_deref(),
            Some("session-3.scope")
        );
    }

    #[test]
    fn pressure_is_read_from_psi_and_meminfo() {
        let psi = "some avg10=31.50 avg60=12.00 avg300=3.00 total=12345\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=1\n";
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:    1200000 kB\n";
        let p = Pressure::parse(Some(psi), Some(meminfo));
        assert_eq!(p.some_avg10, Some(31.5));
        assert!((p.available_percent.unwrap() - 5.0).abs() < 1e-9);
        let mut mp = crate::config::Config::builtin().memory_pressure;
        assert!(p.short(&mp));
        mp.some_avg10 = 50.0;
        assert!(p.short(&mp), "MemAvailable 5% < 10%");
        mp.available_percent = 1.0;
        assert!(!p.short(&mp));
        assert_eq!(Pressure::parse(Some("garbage"), None), Pressure::default());
        assert!(!Pressure::default().short(&mp));
    }

    #[test]
    fn meminfo_is_read_less_often_the_further_memory_is_from_the_threshold() {
        use std::time::Duration;
        // Unknown, at or below the threshold: at every check.
        assert_eq!(meminfo_interval(None, 10.0), Duration::ZERO);
        assert_eq!(meminfo_interval(Some(10.0), 10.0), Duration::ZERO);
        assert_eq!(meminfo_interval(Some(4.0), 10.0), Duration::ZERO);
        assert_eq!(meminfo_interval(Some(f64::NAN), 10.0), Duration::ZERO);
        // 3 points above: 1.5 s at 2 points a second; 20 points: 10 s.
        assert_eq!(
            meminfo_interval(Some(13.0), 10.0),
            Duration::from_millis(1500)
        );
        assert_eq!(meminfo_interval(Some(30.0), 10.0), Duration::from_secs(10));
        // Never longer than 16 s.
        assert_eq!(meminfo_interval(Some(92.0), 10.0), Duration::from_secs(16));
        // Whatever the headroom, memory falling at the bound is still above the threshold
        // when it is read again.
        for available in [10.5, 12.0, 25.0, 41.0, 60.0, 99.0] {
            let wait = meminfo_interval(Some(available), 10.0).as_secs_f64();
            assert!(available - wait * MEM_FALL_PERCENT_PER_SEC >= 10.0 - 1e-9);
        }
    }
}
