//! What the `reaper` subcommands print.
use std::collections::BTreeMap;

use crate::{
    detect::{Explanation, TargetView},
    events::{hidden, word},
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
            format!(
                "  [target {}: {} {:.0}s]",
                t.rule,
                t.verdict.state(),
                t.idle_secs
            )
        });
        out.push_str(&format!(
            "{:>7} {:>7} {:>10} {:>6}  {}{}{}{}{}\n",
            p.id.pid,
            p.ppid,
            p.id.start_ticks,
            p.uid,
            "  ".repeat(depth),
            if p.placeholder {
                "?".into()
            } else {
                word(&p.comm).to_string()
            },
            if argv.is_empty() {
                String::new()
            } else {
                format!("  {argv}")
            },
            if p.argv_truncated { " …" } else { "" },
            mark,
        ));
        for child in p.children.iter().rev() {
            if let Some(c) = by_pid.get(child)
                && c.id.pid != p.id.pid
            {
                stack.push((c, depth + 1));
            }
        }
    }
    out
}

/// `reaper sessions`: one line per agent session.
pub fn render_sessions(sessions: &[crate::detect::session::SessionView]) -> String {
    let mut out = format!(
        "{:>8} {:<14} {:>6} {:<16} {:>8} {:<20} {:>7} {:>5} {:>5} {:>9} {:>9}  {:<10} {}\n",
        "TARGET",
        "STATE",
        "UID",
        "PARENT",
        "QUIET",
        "RULE",
        "SERVERS",
        "TOOLS",
        "OTHER",
        "LEFTOVERS",
        "RSS",
        "COMM",
        "WHERE"
    );
    for s in sessions {
        out.push_str(&format!(
            "{:>8} {:<14} {:>6} {:<16} {:>7.0}s {:<20} {:>7} {:>5} {:>5} {:>9} {:>8.1}M  {:<10} {}\n",
            s.target.pid,
            s.state,
            s.uid,
            format!("{} {}", s.parent, word(&s.parent_comm)),
            s.quiet_secs,
            word(&s.rule),
            s.descendants.stdio_server,
            s.descendants.tool,
            s.descendants.other,
            s.leftovers,
            s.rss_bytes as f64 / (1024.0 * 1024.0),
            word(&s.comm).to_string(),
            word(&s.attribution.short()),
        ));
    }
    if sessions.is_empty() {
        out.push_str("(no agent sessions)\n");
    }
    out
}

/// `reaper stats` for people: the daemon's counters (the `stats` answer of its socket, as
/// JSON) as aligned lines, and what it killed as a table. `--json` prints the answer itself.
pub fn render_stats(stats: &serde_json::Value) -> String {
    use serde_json::Value;
    let num = |v: &Value| v.as_u64().map_or_else(|| v.to_string(), |n| n.to_string());
    // [["fork", 12], …] → "fork 12, …"
    let pairs = |v: &Value| -> String {
        let parts: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some(format!("{} {}", p.get(0)?.as_str()?, num(p.get(1)?))))
            .collect();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(", ")
        }
    };
    let mut rows: Vec<(&str, String)> = vec![
        (
            "mode",
            format!(
                "{} ({})",
                stats["mode"].as_str().unwrap_or("?"),
                stats["config_origin"].as_str().unwrap_or("?")
            ),
        ),
        (
            "rules",
            stats["rules"].as_array().map_or("-".into(), |r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
        ),
        (
            "activity source",
            stats["activity_source"].as_str().unwrap_or("-").to_owned(),
        ),
        ("processes", num(&stats["processes"])),
        ("targets", num(&stats["targets"])),
        (
            "events",
            format!(
                "{} ({})",
                num(&stats["events_total"]),
                pairs(&stats["events"])
            ),
        ),
        (
            "events lost",
            format!("{} ({})", num(&stats["lost_total"]), pairs(&stats["lost"])),
        ),
        ("decode errors", num(&stats["decode_errors"])),
        ("reconciles", num(&stats["reconciles"])),
    ];
    let corrections: Vec<String> = stats["corrections"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} {}", num(v)))
        .collect();
    rows.push(("corrections", corrections.join(", ")));
    let reaps = &stats["reaps"];
    rows.push((
        "reclaimed",
        format!("{} bytes", num(&reaps["reclaimed_bytes"])),
    ));
    rows.push(("identity mismatches", num(&reaps["identity_mismatches"])));
    rows.push(("reload-cancelled", num(&reaps["cancelled"])));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out: String = rows
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect();

    // (rule, reason[, step]) → count, for kills, failures and dry-run decisions.
    let mut table: Vec<[String; 5]> = Vec::new();
    for (what, key) in [
        ("killed", "kills"),
        ("failed", "failures"),
        ("would kill", "would_kill"),
    ] {
        for entry in reaps[key].as_array().into_iter().flatten() {
            let labels: Vec<String> = entry[0]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| l.as_str().unwrap_or("?").to_owned())
                .collect();
            let label = |i: usize| labels.get(i).cloned().unwrap_or_else(|| "-".into());
            table.push([what.into(), label(0), label(1), label(2), num(&entry[1])]);
        }
    }
    out.push('\n');
    if table.is_empty() {
        out.push_str("nothing killed, failed or counted as a would-kill yet\n");
        return out;
    }
    let header = ["OUTCOME", "RULE", "REASON", "STEP", "COUNT"].map(String::from);
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            table
                .iter()
                .chain([&header])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in [&header].into_iter().chain(&table) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 4 {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `reaper explain PID`.
pub fn render_explanation(e: &Explanation) -> String {
    let mut out = String::new();
    let Some(p) = &e.process else {
        return format!(
            "pid {}: not in the daemon's process tree (no such process?)\n",
            e.pid
        );
    };
    out.push_str(&format!(
        "pid {} ({}), parent {}, started at tick {}\n  argv: {}\n",
        p.id.pid,
        word(&p.comm),
        p.ppid,
        p.id.start_ticks,
        if p.argv.is_unknown() {
            "(not read: not a candidate at its exec, and gone from /proc)".to_owned()
        } else {
            p.argv.to_string()
        }
    ));
    if let Some(target) = e.descendant_of {
        out.push_str(&format!(
            "  counted as activity of target {target} (a descendant)\n"
        ));
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
                    word(t.waiting_on_comm.as_deref().unwrap_or("?")),
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
            s.kind
                .map_or(String::new(), |k| format!(", a {}", k.as_str())),
            s.leftover,
        ));
    }
    if let Some(a) = e.attribution.as_ref().filter(|a| **a != Default::default()) {
        out.push_str(&format!(
            "  runs in: unit {}, container {}, pod {}\n",
            a.unit
                .as_deref()
                .map_or("-".into(), |u| word(u).to_string()),
            a.container.as_deref().unwrap_or("-"),
            a.pod.as_deref().unwrap_or("-"),
        ));
    }
    if let Some(step) = &e.first_step {
        out.push_str(&format!(
            "  kill ladder: clean_end = \"{}\", stdin {} → first step: {}; then SIGTERM after eof_grace, SIGKILL after grace\n",
            step.clean_end.as_str(),
            step.stdin.as_deref().map_or("unknown".into(), |s| word(s).to_string()),
            step.step,
        ));
    }
    out
}

/// `value` as JSON for a terminal or a pipe: like `serde_json`'s output (pretty or one line),
/// with every [`hidden`] character a string holds written as a `\uXXXX` escape too.
/// `serde_json` escapes only C0 controls, so a bidi override or a zero-width character in a
/// process's comm or argv would otherwise reach the reader as itself; decoded, the value is
/// unchanged.
pub fn json(value: &impl serde::Serialize, pretty: bool) -> serde_json::Result<String> {
    let mut out = Vec::new();
    if pretty {
        let mut ser = serde_json::Serializer::with_formatter(
            &mut out,
            Escaping(serde_json::ser::PrettyFormatter::new()),
        );
        value.serialize(&mut ser)?;
    } else {
        let mut ser = serde_json::Serializer::with_formatter(
            &mut out,
            Escaping(serde_json::ser::CompactFormatter),
        );
        value.serialize(&mut ser)?;
    }
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

/// A `serde_json` formatter that also escapes [`hidden`] characters; layout from the inner one.
struct Escaping<F>(F);

macro_rules! delegate {
    ($($name:ident $(($arg:ident: $ty:ty))?),* $(,)?) => {$(
        fn $name<W: ?Sized + std::io::Write>(&mut self, w: &mut W $(, $arg: $ty)?) -> std::io::Result<()> {
            self.0.$name(w $(, $arg)?)
        }
    )*};
}

impl<F: serde_json::ser::Formatter> serde_json::ser::Formatter for Escaping<F> {
    delegate!(
        begin_array, end_array, begin_array_value(first: bool), end_array_value,
        begin_object, end_object, begin_object_key(first: bool), begin_object_value, end_object_value,
    );

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (at, c) in fragment.char_indices() {
            if hidden(c) {
                w.write_all(&fragment.as_bytes()[start..at])?;
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(w, "\\u{unit:04x}")?;
                }
                start = at + c.len_utf8();
            }
        }
        w.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::{Argv, Identity},
        tree::{ProcessTree, Snapshot},
    };

    #[test]
    fn stats_read_as_a_table() {
        let stats = serde_json::json!({
            "processes": 79, "events": [["fork", 10], ["exec", 7]], "events_total": 17,
            "lost": [["fork", 0]], "lost_total": 0, "decode_errors": 0,
            "corrections": {"added": 1, "removed": 0}, "reconciles": 3,
            "activity_source": "socket", "config_origin": "/etc/reaper/reaper.toml",
            "mode": "enforce", "rules": ["claude-sdk"], "targets": 2,
            "reaps": {"kills": [[["claude-sdk", "idle", "closed"], 4]],
                      "failures": [[["claude-sdk", "orphaned"], 1]], "would_kill": [],
                      "reclaimed_bytes": 1024, "identity_mismatches": 0, "cancelled": 2}
        });
        let text = render_stats(&stats);
        assert!(text.contains("reload-cancelled     2"), "{text}");
        assert!(
            text.contains("events               17 (fork 10, exec 7)"),
            "{text}"
        );
        assert!(
            text.contains("mode                 enforce (/etc/reaper/reaper.toml)"),
            "{text}"
        );
        assert!(
            text.contains("OUTCOME  RULE        REASON    STEP    COUNT"),
            "{text}"
        );
        assert!(
            text.contains("killed   claude-sdk  idle      closed      4"),
            "{text}"
        );
        assert!(
            text.contains("failed   claude-sdk  orphaned  -           1"),
            "{text}"
        );
    }

    #[test]
    fn indents_children_under_parents() {
        let snap = |pid, ppid, comm: &str| Snapshot {
            id: Identity {
                pid,
                start_ticks: u64::from(pid),
            },
            ppid,
            uid: 0,
            comm: comm.into(),
            exe: String::new(),
            argv: Argv::from_args(&[comm, "-x"]),
            argv_truncated: false,
        };
        let tree = ProcessTree::from_scan(vec![
            snap(1, 0, "init"),
            snap(5, 1, "sshd"),
            snap(9, 5, "bash"),
            snap(7, 1, "cron"),
        ]);
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
            id: Identity {
                pid: 4,
                start_ticks: 4,
            },
            ppid: 0,
            uid: 0,
            comm: "we\nird".into(),
            exe: String::new(),
            argv: Argv::from_args(&["bash", "-c", "X='#!/bin/bash\necho hi'\t\u{1b}[31m"]),
            argv_truncated: false,
        };
        let processes: Vec<_> = ProcessTree::from_scan(vec![snap])
            .processes()
            .cloned()
            .collect();
        let text = render_tree(&processes, &[]);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.ends_with("\"we\\nird\"  bash -c \"X='#!/bin/bash\\necho hi'\\t\\u{1b}[31m\"\n"),
            "{text}"
        );
    }

    #[test]
    fn json_output_escapes_bidi_and_invisible_characters() {
        let value = serde_json::json!({ "comm": "a\u{202e}b\u{200b}\u{feff}\u{e0001}\n\u{1b}", "argv": ["é", "日本"] });
        for pretty in [false, true] {
            let text = json(&value, pretty).unwrap();
            assert!(
                !text.chars().any(|c| hidden(c) && c != '\n'),
                "a hidden character printed as itself: {text:?}"
            );
            assert!(
                text.contains(r"a\u202eb\u200b\ufeff\udb40\udc01\n\u001b"),
                "{text}"
            );
            assert!(text.contains("日本"), "ordinary text is left alone: {text}");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&text).unwrap(),
                value,
                "same value"
            );
            assert_eq!(text.contains('\n'), pretty);
        }
    }
}
