//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/` for a bounded time.
//!
//! `fuzz/` is a crate of its own (outside the workspace: it builds only with nightly and
//! libFuzzer's instrumentation). Its targets feed reaper's parsers of untrusted input: ring
//! buffer records (`decode`), configuration text (`config`), kernel-shaped `/proc` files through
//! procfs (`proc_files`), and process-controlled comm/exe/argv through the rule matcher
//! (`cmdline`).
//!
//! The same target files are also built and run by `cargo xtask test`, on stable and without
//! libFuzzer: `fuzz/replay` (a member of the main workspace) compiles each as a test program
//! that replays its corpus and mutations of it for a few seconds, so a target that no longer
//! compiles or a seed that now crashes fails the ordinary test run. This verb is the
//! coverage-guided fuzzing.
//!
//! cargo-fuzz is installed once with `cargo install` into `<target>/fuzz-tools` (not `.tools`,
//! which holds the eBPF toolchain). Builds go to `<target>/fuzz`. The seed corpus in
//! `fuzz/corpus/<target>` is only read: new inputs libFuzzer finds go to
//! `<target>/fuzz/corpus/<target>` (kept between runs), crashes to
//! `<target>/fuzz/artifacts/<target>/`, each run's log to `<target>/fuzz/logs/<target>.log`.
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, bail};

use crate::Ctx;
use crate::cmd::{describe, status};

/// The cargo-fuzz release installed when missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Opts {
    /// Seconds to fuzz each target (libFuzzer's -max_total_time).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Fuzz only this target (repeatable); default: every target in fuzz/fuzz_targets.
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
}

/// What one target's run reported.
#[derive(Debug, Default, PartialEq)]
struct Summary {
    runs: u64,
    seconds: u64,
    exec_per_sec: u64,
    coverage: u64,
    corpus: u64,
}

pub(crate) fn run(ctx: &Ctx, opts: &Opts) -> anyhow::Result<ExitCode> {
    let fuzz_dir = ctx.workspace.join("fuzz");
    let available = targets(&fuzz_dir)?;
    let chosen: Vec<String> = if opts.targets.is_empty() {
        available.clone()
    } else {
        for t in &opts.targets {
            if !available.contains(t) {
                bail!("no fuzz target {t:?}; there are: {}", available.join(", "));
            }
        }
        opts.targets.clone()
    };
    let cargo_fuzz = ensure_cargo_fuzz(ctx)?;
    let out = ctx.target_dir.join("fuzz");

    // One build for every target (the first one instruments every dependency: minutes).
    let mut build = fuzz_cmd(ctx, &cargo_fuzz);
    build
        .args(["build", "--fuzz-dir"])
        .arg(&fuzz_dir)
        .arg("--target-dir")
        .arg(&out);
    println!("xtask: {}", describe(&build));
    let st = status(&mut build)?;
    if !st.success() {
        bail!("building the fuzz targets failed ({st})");
    }

    let mut failed = Vec::new();
    let mut lines = Vec::new();
    for target in &chosen {
        let corpus = out.join("corpus").join(target);
        let artifacts = out.join("artifacts").join(target);
        let logs = out.join("logs");
        for dir in [&corpus, &artifacts, &logs] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log = logs.join(format!("{target}.log"));
        let mut cmd = fuzz_cmd(ctx, &cargo_fuzz);
        cmd.args(["run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg("--target-dir")
            .arg(&out)
            .arg(target)
            // The first corpus directory receives new inputs; the seeds are only read.
            .arg(&corpus)
            .arg(fuzz_dir.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={}", opts.seconds))
            // Exec records are 4,416 bytes; libFuzzer's default limit is 4,096.
            .arg("-max_len=8192")
            .arg("-timeout=10")
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        println!(
            "xtask: fuzzing {target} for {} s (log: {})",
            opts.seconds,
            log.display()
        );
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let st = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()
            .with_context(|| format!("cannot run `{}`", describe(&cmd)))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let summary = summarize(&text);
        let line = match &summary {
            Some(s) => format!(
                "{target:<12} {:>9} runs in {:>3} s ({:>6}/s), coverage {:>5}, corpus {:>5} inputs",
                s.runs, s.seconds, s.exec_per_sec, s.coverage, s.corpus
            ),
            None => format!("{target:<12} no libFuzzer summary"),
        };
        if st.success() && summary.is_some() {
            lines.push(format!("{line} — ok"));
        } else {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            eprintln!(
                "xtask: {target} failed ({st}); crash inputs are in {} (reproduce: cargo +nightly \
                 fuzz run --fuzz-dir fuzz {target} <file>)",
                artifacts.display()
            );
            lines.push(format!("{line} — FAILED ({st})"));
            failed.push(target.clone());
        }
    }
    println!("xtask: fuzz results ({} s per target):", opts.seconds);
    for line in &lines {
        println!("  {line}");
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("xtask: fuzz targets failed: {}", failed.join(", "));
        Ok(ExitCode::FAILURE)
    }
}

/// `cargo-fuzz fuzz …` with the nightly toolchain and `<tools>/bin` (bpf-linker, for the eBPF
/// object reaper-user embeds) on PATH.
fn fuzz_cmd(ctx: &Ctx, cargo_fuzz: &Path) -> Command {
    let mut cmd = Command::new(cargo_fuzz);
    cmd.arg("fuzz")
        .current_dir(&ctx.workspace)
        .env("PATH", &ctx.path)
        .env("RUSTUP_TOOLCHAIN", "nightly");
    cmd
}

/// The fuzz targets: `fuzz/fuzz_targets/*.rs`, sorted.
fn targets(fuzz_dir: &Path) -> anyhow::Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(names)
}

/// `<target>/fuzz-tools/bin/cargo-fuzz`, installed with `cargo install` if missing (idempotent).
fn ensure_cargo_fuzz(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    let root = ctx.target_dir.join("fuzz-tools");
    let bin = root.join("bin").join("cargo-fuzz");
    let works = |bin: &Path| {
        Command::new(bin)
            .args(["fuzz", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&bin) {
        println!("xtask: cargo-fuzz: present ({})", bin.display());
        return Ok(bin);
    }
    // Built in cargo's own temporary directory, not the workspace's target.
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
        "--root",
    ])
    .arg(&root)
    .env("PATH", &ctx.path)
    .env_remove("CARGO_TARGET_DIR");
    println!("xtask: {}", describe(&cmd));
    let st = status(&mut cmd)?;
    if !st.success() || !works(&bin) {
        bail!(
            "installing cargo-fuzz into {} failed ({st})",
            root.display()
        );
    }
    Ok(bin)
}

/// libFuzzer's closing lines: `#N DONE cov: C ft: F corp: K/…b … exec/s: E …` and
/// `Done N runs in S second(s)`.
fn summarize(log: &str) -> Option<Summary> {
    let done = log.lines().rev().find_map(|l| l.strip_prefix("Done "))?;
    let mut words = done.split_whitespace();
    let runs = words.next()?.parse().ok()?;
    let seconds = words.nth(2)?.parse().ok()?;
    let mut summary = Summary {
        runs,
        seconds,
        ..Summary::default()
    };
    if let Some(stats) = log.lines().rev().find(|l| l.contains("DONE ")) {
        let value = |key: &str| {
            let rest = stats.split(key).nth(1)?;
            let word = rest.split_whitespace().next()?;
            word.split('/').next()?.parse().ok()
        };
        summary.coverage = value("cov: ").unwrap_or(0);
        summary.corpus = value("corp: ").unwrap_or(0);
        summary.exec_per_sec = value("exec/s: ").unwrap_or(0);
    }
    Some(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_summaries() {
        let log = "INFO: Seed: 1\n#8\tINITED cov: 626 ft: 913 corp: 7/13397b exec/s: 0 rss: 60Mb\n\
                   #30628\tDONE   cov: 722 ft: 1682 corp: 218/372Kb lim: 4417 exec/s: 2784 rss: 414Mb\n\
                   Done 30628 runs in 11 second(s)\n";
        assert_eq!(
            summarize(log),
            Some(Summary {
                runs: 30628,
                seconds: 11,
                exec_per_sec: 2784,
                coverage: 722,
                corpus: 218,
            })
        );
        assert_eq!(summarize("==1== ERROR: libFuzzer: deadly signal\n"), None);
    }
}
