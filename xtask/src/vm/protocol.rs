//! What the guest says on its console, one line each (tests/src/bin/vm_runner.rs and
//! service_check.rs write them): `vm-kernel:`, `vm-offsets:`, `vm-sock-tracepoints:`,
//! `vm-check NAME: PASS|FAIL detail`, `vm-result: N passed, M failed`, `vm-error …`.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::output;

/// What one machine reported.
#[derive(Debug, Default)]
pub(crate) struct Run {
    /// Wall seconds from starting QEMU to the runner's first line.
    pub(super) boot: Option<f64>,
    pub(super) total: f64,
    pub(super) timed_out: bool,
    pub(super) kernel_line: Option<String>,
    pub(super) checks: Vec<(String, bool, String)>,
    pub(super) result: Option<String>,
    pub(super) offsets: Vec<(String, String)>,
    pub(super) sock_tracepoints: Option<String>,
    pub(super) errors: Vec<String>,
    pub(super) log: PathBuf,
}

impl Run {
    pub(super) fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.1).count()
    }
    pub(super) fn failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.1).count()
    }
    /// Every check passed and the runner finished, and its own count (`vm-result: N passed,
    /// M failed`) agrees with the check lines read: a line garbled on the console (kernel
    /// messages share it) cannot hide a failure.
    pub(super) fn ok(&self) -> bool {
        let counted = self.result.as_deref().and_then(parse_result);
        !self.timed_out
            && counted == Some((self.passed(), self.failed()))
            && self.failed() == 0
            && self.passed() > 0
    }

    /// Takes in one console line (`is_err`: QEMU's own stderr); whether it is worth showing
    /// when the console is not shown whole.
    pub(super) fn record(&mut self, line: &str, is_err: bool) -> bool {
        let after = |tag: &str| line.split_once(tag).map(|(_, rest)| rest.to_owned());
        if let Some(check) = parse_check(line) {
            self.checks.push(check);
            true
        } else if let Some(offsets) = parse_offsets(line) {
            self.offsets = offsets;
            false
        } else if let Some(r) = after("vm-result: ") {
            self.result = Some(r);
            true
        } else if let Some(k) = after("vm-kernel: ") {
            self.kernel_line = Some(k);
            true
        } else if let Some(s) = after("vm-sock-tracepoints: ") {
            self.sock_tracepoints = Some(s);
            true
        } else if line.contains("vm-error")
            || line.contains("Kernel panic")
            || line.contains("panicked")
            || is_err
        {
            self.errors.push(line.to_owned());
            true
        } else {
            line.contains("vm-runner:")
        }
    }
}

/// The host kernel's release and offsets, from the static runner itself.
pub(super) fn host_layout(runner: &Path) -> Option<(String, Vec<(String, String)>)> {
    let text = output(Command::new(runner).arg("--print-offsets")).ok()?;
    let mut release = String::from("host");
    let mut offsets = Vec::new();
    for line in text.lines() {
        if let Some(r) = line.strip_prefix("vm-kernel: ") {
            release = r.trim().to_owned();
        }
        if let Some(o) = parse_offsets(line) {
            offsets = o;
        }
    }
    Some((release, offsets))
}

/// `vm-offsets: KernelOffsets { ready: 1, task_pid: 2456, … }` → [(task_pid, 2456), …].
fn parse_offsets(line: &str) -> Option<Vec<(String, String)>> {
    let rest = &line[line.find("vm-offsets: ")? + "vm-offsets: ".len()..];
    let inner = rest.get(rest.find('{')? + 1..rest.rfind('}')?)?;
    Some(
        inner
            .split(',')
            .filter_map(|kv| kv.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect(),
    )
}

/// `N passed, M failed` (after `vm-result: `) → (N, M).
fn parse_result(text: &str) -> Option<(usize, usize)> {
    let (passed, failed) = text.trim().split_once(", ")?;
    Some((
        passed.strip_suffix(" passed")?.parse().ok()?,
        failed.strip_suffix(" failed")?.parse().ok()?,
    ))
}

/// `vm-check NAME: PASS|FAIL detail` → (NAME, passed, detail).
fn parse_check(line: &str) -> Option<(String, bool, String)> {
    let rest = &line[line.find("vm-check ")? + "vm-check ".len()..];
    let (name, rest) = rest.split_once(": ")?;
    let (word, detail) = rest.split_once(' ').unwrap_or((rest, ""));
    let passed = match word {
        "PASS" => true,
        "FAIL" => false,
        _ => return None,
    };
    Some((name.to_owned(), passed, detail.to_owned()))
}

/// A console line without its carriage returns and terminal escape sequences (SeaBIOS and
/// QEMU's `-nographic` clear the screen and turn off line wrap).
pub(super) fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            // CSI (ESC [ parameters, up to a final byte in @..~) or a two-byte ESC c, ESC 7, …
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' | '\n' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_ok_only_when_its_own_count_agrees() {
        assert_eq!(parse_result("10 passed, 0 failed"), Some((10, 0)));
        assert_eq!(parse_result("garbled"), None);
        let mut run = Run {
            checks: vec![
                ("a".into(), true, String::new()),
                ("b".into(), true, String::new()),
            ],
            result: Some("2 passed, 0 failed".into()),
            ..Run::default()
        };
        assert!(run.ok());
        // The runner counted a failure whose line never arrived intact.
        run.result = Some("2 passed, 1 failed".into());
        assert!(!run.ok());
        run.result = None;
        assert!(!run.ok());
    }

    #[test]
    fn parses_runner_lines() {
        assert_eq!(
            parse_check("vm-check rename: PASS [0.3s] pid 7: ok"),
            Some(("rename".into(), true, "[0.3s] pid 7: ok".into()))
        );
        assert_eq!(
            parse_check("noise vm-check attach: FAIL boom").map(|c| c.1),
            Some(false)
        );
        assert!(parse_check("vm-check x: MAYBE").is_none());
        assert_eq!(
            strip_escapes("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (1.16)\r\n"),
            "SeaBIOS (1.16)"
        );
        let o = parse_offsets("vm-offsets: KernelOffsets { ready: 1, task_pid: 2456 }").unwrap();
        assert_eq!(
            o,
            [
                ("ready".into(), "1".into()),
                ("task_pid".into(), "2456".into())
            ]
        );
    }
}
