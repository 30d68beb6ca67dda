//! What the `reaper` subcommands print.
use std::collections::BTreeMap;

use crate::{
    detect::{Explanation, TargetView},
    events::printable,
    tree::Process,
};

/// Longest argv shown per line of `reaper tree`.
const ARGV_SHOWN: usize = 160;

/// `reaper tree`: processes depth-first from the roots, children indented under parents;
/// targets are marked with their rule and verdict.
pub fn render_tree(processes: &[Process], targets: &[TargetView]) -> String {
    let by_pid: BTreeMap<u32, &Process> = processes.iter().map(|p| (p.id.pid, p)).collect();
    let marks: BTreeMap<u32, &TargetView> = targets.iter().map(|t| (t.id.pid, t)).collect();
    let mut out = format!(
        "{:>7} {:>7} {:>10} {:>6}  {}\n",
        "PID", "PPID", "START", "UID", "COMM  ARGV"
    );
    let roots = by_pid
        .values()
        .filter(|p| p.ppid == p.id.pid || !by_pid.contains_key(&p.ppid));
    let mut stack: Vec<(&Process, usize)> = roots.rev().map(|p| (*p, 0)).collect();
    while let Some((p, depth)) = stack.pop() {
        let mut argv = p.argv.to_string();
        if argv.chars().count() > ARGV_SHOWN {
            argv = argv.chars().take(ARGV_SHOWN).collect::<String>() + "…";
        }
        let mark = marks.get(&p.id.pid).map_or(String::new(), |t| {
            format!("  [target {}: {} {:.0}s]", t.rule, t.verdict.state(), t.idle_secs)
        });
        out.push_str(&format!(
            "{:>7} {:>7} {:>10} {:>6}  {}{}{}{}{}\n",
            p.id.pid,
            p.ppid,
            p.id.start_ticks,
            p.uid,
            "  ".repeat(depth),
            if p.placeholder { "?".into() } else { printable(&p.comm) },
            if argv.is_empty() { String::new() } else { format!("  {argv}") },
            if p.argv_truncated { " …" } else { "" },
            mark,
        ));
        for child in p.children.iter().rev() {
            if let Some(c) = by_pid.get(child)
                && c.id.pid != p.id.pid {
                    stack.push((c, depth + 1));
                }
        }
    }
    out
}

/// `reaper sessions`: one line per agent session.
pub fn render_sessions(sessions: &[crate::detect::session::SessionView]) -> String {
    let mut out = format!(
        "{:>8} {:<14} {:>6} {:<16} {:>8} {:<20} {:>7} {:>5} {:>5} {:>9} {:>9}  {}\n",
        "TARGET", "STATE", "UID", "PARENT", "QUIET", "RULE", "SERVERS", "TOOLS", "OTHER", "LEFTOVERS", "RSS", "COMM"
    );
    for s in sessions {
        out.push_str(&format!(
            "{:>8} {:<14} {:>6} {:<16} {:>7.0}s {:<20} {:>7} {:>5} {:>5} {:>9} {:>8.1}M  {}\n",
            s.target.pid,
            s.state,
            s.uid,
            format!("{} {}", s.parent, printable(&s.parent_comm)),
            s.quiet_secs,
            printable(&s.rule),
            s.descendants.stdio_server,
            s.descendants.tool,
            s.descendants.other,
            s.leftovers,
            s.rss_bytes as f64 / (1024.0 * 1024.0),
            printable(&s.comm),
        ));
    }
    if sessions.is_empty() {
        out.push_str("(no agent sessions)\n");
    }
    out
}

/// `reaper explain PID`.
pub fn render_explanation(e: &Explanation) -> String {
    let mut out = String::new();
    let Some(p) = &e.process else {
        return format!("pid {}: not in the daemon's process tree (no such process?)\n", e.pid);
    };
    out.push_str(&format!(
        "pid {} ({}), parent {}, started at tick {}\n  argv: {}\n",
        p.id.pid, printable(&p.comm), p.ppid, p.id.start_ticks, p.argv
    ));
    if let Some(target) = e.descendant_of {
        out.push_str(&format!("  counted as activity of target {target} (a descendant)\n"));
    }
    for r in &e.rules {
        match &r.why_not {
            None => out.push_str(&format!("  rule {}: matches\n", r.rule)),
            Some(why) => out.push_str(&format!("  rule {}: no — {why}\n", r.rule)),
        }
    }
    match &e.target {
        None => out.push_str("  not a target: reaper will not signal it\n"),
        Some(t) => {
            let ev = &t.evidence;
            out.push_str(&format!(
                "  target of rule {}: {} — idle for {:.0}s (last activity: {:?}), cpu {}, last socket byte {}, {} descendant(s){}\n",
                t.rule,
                t.verdict.state(),
                t.idle_secs,
                ev.last_activity_kind,
                ev.cpu_rate.map_or("n/a".into(), |r| format!("{:.2}%", r * 100.0)),
                if ev.last_socket_byte.is_some() { "seen" } else { "none yet" },
                t.descendants,
                if ev.orphaned_since.is_some() { ", orphaned (its parent exited)" } else { "" },
            ));
            if let (Some(w), Some(secs)) = (ev.turn, t.waiting_secs) {
                out.push_str(&format!(
                    "  turn in flight: waiting on pid {} ({}) since {secs:.0}s ago, started after the model's last word: never idle while it runs\n",
                    w.pid,
                    printable(t.waiting_on_comm.as_deref().unwrap_or("?")),
                ));
            }
            if ev.watch_failed {
                out.push_str("  the kernel could not watch all of its processes (map full): never reaped as idle\n");
            }
        }
    }
    if let Some(s) = &e.session {
        out.push_str(&format!(
            "  session of target {} ({}){}: {}\n",
            s.target,
            if s.ended { "ended" } else { "live" },
            s.kind.map_or(String::new(), |k| format!(", a {}", k.as_str())),
            s.leftover,
        ));
    }
    if let Some(step) = &e.first_step {
        out.push_str(&format!(
            "  kill ladder: clean_end = \"{}\", stdin {} → first step: {}; then SIGTERM after eof_grace, SIGKILL after grace\n",
            step.clean_end.as_str(),
            step.stdin.as_deref().map_or("unknown".into(), printable),
            step.step,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::{Argv, Identity},
        tree::{ProcessTree, Snapshot},
    };

    #[test]
    fn indents_children_under_parents() {
        let snap = |pid, ppid, comm: &str| Snapshot {
            id: Identity { pid, start_ticks: u64::from(pid) },
            ppid,
            uid: 0,
            comm: comm.into(),
            exe: String::new(),
            argv: Argv::from_args(&[comm, "-x"]),
        };
        let tree = ProcessTree::from_scan(vec![snap(1, 0, "init"), snap(5, 1, "sshd"), snap(9, 5, "bash"), snap(7, 1, "cron")]);
        let processes: Vec<_> = tree.processes().cloned().collect();
        let text = render_tree(&processes, &[]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("PID"));
        assert!(lines[1].ends_with("init  init -x"), "{text}");
        assert!(lines[2].ends_with("  sshd  sshd -x"), "{text}");
        assert!(lines[3].ends_with("    bash  bash -x"), "{text}");
        assert!(lines[4].ends_with("  cron  cron -x"), "{text}");
    }

    #[test]
    fn a_multi_line_argv_or_comm_stays_on_one_line() {
        let snap = Snapshot {
            id: Identity { pid: 4, start_ticks: 4 },
            ppid: 0,
            uid: 0,
            comm: "we\nird".into(),
            exe: String::new(),
            argv: Argv::from_args(&["bash", "-c", "X='#!/bin/bash\necho hi'\t\u{1b}[31m"]),
        };
        let processes: Vec<_> = ProcessTree::from_scan(vec![snap]).processes().cloned().collect();
        let text = render_tree(&processes, &[]);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.ends_with("we\\nird  bash -c X='#!/bin/bash\\necho hi'\\t\\u{1b}[31m\n"),
            "{text}"
        );
    }
}
