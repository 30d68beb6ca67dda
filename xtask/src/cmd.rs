//! Small helpers around `std::process::Command` that turn failures into readable errors.
use std::io::{BufRead as _, BufReader};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context as _, bail};

/// The command line as a person would type it (env overrides first).
pub(crate) fn describe(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter(|(k, _)| *k != "PATH" && *k != "CARGO_TARGET_DIR" && *k != "RUSTUP_AUTO_INSTALL")
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

fn spawn_error(cmd: &Command, e: std::io::Error) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy();
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "`{program}` was not found on PATH (needed for `{}`)",
            describe(cmd)
        )
    } else {
        anyhow::Error::new(e).context(format!("cannot run `{}`", describe(cmd)))
    }
}

/// Runs with inherited stdio and returns the exit status (not checked).
pub(crate) fn status(cmd: &mut Command) -> anyhow::Result<ExitStatus> {
    cmd.status().map_err(|e| spawn_error(cmd, e))
}

/// Runs, requires success, and returns stdout as UTF-8 (stderr is included in the error).
pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, e))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

/// Runs with stdout inherited and stderr both shown live and captured; returns the status
/// (not checked) and the captured stderr.
pub(crate) fn status_tee_stderr(cmd: &mut Command) -> anyhow::Result<(ExitStatus, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, e))?;
    let mut captured = String::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.with_context(|| format!("reading stderr of `{}`", describe(cmd)))?;
            eprintln!("{line}");
            captured.push_str(&line);
            captured.push('\n');
        }
    }
    let st = child
        .wait()
        .with_context(|| format!("waiting for `{}`", describe(cmd)))?;
    Ok((st, captured))
}

/// Pass and fail counts summed over libtest's `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) passed: u64,
    pub(crate) failed: u64,
    pub(crate) ignored: u64,
}

impl Totals {
    /// Adds one libtest summary line, e.g.
    /// `test result: ok. 11 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; …`.
    pub(crate) fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs with stdout shown live and scanned for libtest summaries; returns the status (not
/// checked) and the totals.
pub(crate) fn status_counting_tests(cmd: &mut Command) -> anyhow::Result<(ExitStatus, Totals)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, e))?;
    let mut totals = Totals::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.with_context(|| format!("reading stdout of `{}`", describe(cmd)))?;
            println!("{line}");
            totals.add_line(&line);
        }
    }
    let st = child
        .wait()
        .with_context(|| format!("waiting for `{}`", describe(cmd)))?;
    Ok((st, totals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_summaries() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 11 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 8.85s");
        t.add_line("test result: FAILED. 6 passed; 4 failed; 0 ignored; 0 measured; 0 filtered out; finished in 99.04s");
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 17,
                failed: 4,
                ignored: 2
            }
        );
    }
}
