//! What the `reaper` subcommands print.
use std::collections::BTreeMap;

use crate::tree::Process;

/// `reaper tree`: processes depth-first from the roots, children indented under parents.
pub fn render_tree(processes: &[Process]) -> String {
    let by_pid: BTreeMap<u32, &Process> = processes.iter().map(|p| (p.id.pid, p)).collect();
    let mut out = format!(
        "{:>7} {:>7} {:>10} {:>6}  {}\n",
        "PID", "PPID", "START", "UID", "COMM  ARGV"
    );
    let roots = by_pid
        .values()
        .filter(|p| p.ppid == p.id.pid || !by_pid.contains_key(&p.ppid));
    let mut stack: Vec<(&Process, usize)> = roots.rev().map(|p| (*p, 0)).collect();
    while let Some((p, depth)) = stack.pop() {
        let argv = p.argv.to_string();
        out.push_str(&format!(
            "{:>7} {:>7} {:>10} {:>6}  {}{}{}{}\n",
            p.id.pid,
            p.ppid,
            p.id.start_ticks,
            p.uid,
            "  ".repeat(depth),
            if p.placeholder { "?" } else { &p.comm },
            if argv.is_empty() { String::new() } else { format!("  {argv}") },
            if p.argv_truncated { " …" } else { "" },
        ));
        for child in p.children.iter().rev() {
            if let Some(c) = by_pid.get(child) {
                if c.id.pid != p.id.pid {
                    stack.push((c, depth + 1));
                }
            }
        }
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
        let text = render_tree(&processes);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("PID"));
        assert!(lines[1].ends_with("init  init -x"), "{text}");
        assert!(lines[2].ends_with("  sshd  sshd -x"), "{text}");
        assert!(lines[3].ends_with("    bash  bash -x"), "{text}");
        assert!(lines[4].ends_with("  cron  cron -x"), "{text}");
    }
}
