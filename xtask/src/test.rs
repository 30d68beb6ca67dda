//! `cargo xtask test`: every host test one at a time (they share kernel state), then the
//! kernel matrix (`vm-test`), with one closing count over all of them.
use std::ffi::OsString;
use std::process::ExitCode;

use crate::cmd::{self, describe};
use crate::{Ctx, dist, e2e, exit_code, vm};

/// Builds what the tests run (the daemon, `dist`, the end-to-end SDKs), runs `cargo test` over
/// `package` (the workspace when empty) with `args` for the harness, then the kernel matrix
/// unless `no_vm` or a filter was given.
pub(crate) fn run(
    ctx: &Ctx,
    package: &[String],
    release: bool,
    no_vm: bool,
    args: &[OsString],
) -> anyhow::Result<ExitCode> {
    // The command-line tests (tests/tests/cli.rs) run target/<profile>/reaper, which
    // `cargo test` does not build: build it first, with the tests' profile.
    ctx.build_daemon(!release)?;
    let mut cmd = ctx.cargo();
    // tests/tests/ship.rs checks what operators install: build it first (warm: seconds;
    // the static build is the one the kernel matrix uses). A failure fails those tests,
    // not the others.
    match dist::run(ctx) {
        Ok(artifacts) => {
            cmd.env("REAPER_DIST_DIR", &artifacts.dir);
        }
        Err(err) => {
            eprintln!("xtask: cargo xtask dist failed: {err:#}");
            cmd.env("REAPER_DIST_ERROR", format!("{err:#}"));
        }
    }
    cmd.arg("test");
    // The end-to-end tests drive the real SDKs and CLI: install them first. If that
    // fails, say why once and run the tests anyway: the e2e tests fail with the reason.
    if package.is_empty() || package.iter().any(|p| p == "reaper-tests") {
        cmd.env("REAPER_E2E_DIR", e2e::dir(ctx));
        if let Err(err) = e2e::setup(ctx) {
            eprintln!("xtask: error: {err:#}");
            cmd.env("REAPER_E2E_ERROR", format!("{err:#}"));
        }
    }
    if package.is_empty() {
        cmd.args(["--workspace", "--exclude", "reaper-ebpf"]);
    } else {
        for p in package {
            cmd.args(["--package", p]);
        }
    }
    if release {
        cmd.arg("--release");
    }
    // Run every test binary even after one fails; the exit status still reports failure.
    cmd.args(["--no-fail-fast", "--"]);
    // The integration tests share kernel state: one test at a time, unless the caller
    // chose a thread count (libtest rejects the option given twice).
    let threads_given = args
        .iter()
        .any(|a| a.to_str().is_some_and(|a| a.starts_with("--test-threads")));
    if !threads_given {
        cmd.arg("--test-threads=1");
    }
    cmd.args(args);
    println!("xtask: {}", describe(&cmd));
    let (st, mut totals) = cmd::status_counting_tests(&mut cmd)?;
    if !st.success() {
        eprintln!("xtask: tests failed ({st})");
    }
    // A full run also runs the lifecycle and reaping checks on other kernels in QEMU.
    let mut vm_ok = true;
    if package.is_empty() && args.is_empty() && !no_vm {
        match vm::run(ctx, &vm::Opts::default()) {
            Ok(outcome) => {
                vm_ok = outcome.failed == 0;
                totals.passed += outcome.passed;
                totals.failed += outcome.failed;
            }
            Err(err) => {
                eprintln!("xtask: the kernel matrix could not run: {err:#}");
                vm_ok = false;
                totals.failed += 1;
            }
        }
    }
    // One closing line over every test binary (cargo's own last line is a doc-test
    // summary, often "0 passed").
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !st.success() {
        return Ok(exit_code(st));
    }
    if !vm_ok {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
