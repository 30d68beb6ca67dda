//! `cargo xtask clippy`: the checks that read the code without running it. Clippy with warnings
//! denied on the host crates, then on the eBPF crate (nightly, bpfel-unknown-none), as aya's
//! xtask does; `cargo fmt --all --check`; and unused dependencies (cargo-machete, installed
//! into `<tools>/bin` once, the way `setup` installs bpf-linker). Every check runs; the verb
//! fails if any did.
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::bail;

use crate::cmd::{describe, output, status};
use crate::{Ctx, setup};

/// cargo-machete builds on stable in about a minute and reads only the manifests and sources
/// (cargo-udeps needs nightly and a full build).
const MACHETE_VERSION: &str = "0.9.2";

pub(crate) fn run(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let mut failed = Vec::new();

    let mut host = ctx.cargo();
    host.args([
        "clippy",
        "--workspace",
        "--exclude",
        "reaper-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    check(&mut host, "clippy on the host crates", &mut failed)?;

    // The eBPF crate builds only for the BPF target, with nightly's build-std (as aya-build
    // does); its own target dir keeps it apart from the host build.
    setup::ensure_nightly_component("clippy")?;
    let mut ebpf = ctx.nightly_cargo();
    ebpf.args([
        "clippy",
        "--package",
        "reaper-ebpf",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--release",
        "--target-dir",
    ])
    .arg(ctx.target_dir.join("ebpf-clippy"))
    .args(["--", "-D", "warnings"]);
    check(&mut ebpf, "clippy on the eBPF crate", &mut failed)?;

    let mut fmt = ctx.cargo();
    fmt.args(["fmt", "--all", "--check"]);
    check(&mut fmt, "rustfmt", &mut failed)?;

    let machete = ensure_machete(ctx)?;
    let mut unused = Command::new(machete);
    unused.current_dir(&ctx.workspace);
    check(
        &mut unused,
        "the unused-dependency check (cargo-machete)",
        &mut failed,
    )?;

    if failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("xtask: clippy: failed: {}", failed.join(", "));
    Ok(ExitCode::FAILURE)
}

/// Runs `cmd`, noting `what` in `failed` if it fails.
fn check(
    cmd: &mut Command,
    what: &'static str,
    failed: &mut Vec<&'static str>,
) -> anyhow::Result<()> {
    println!("xtask: {}", describe(cmd));
    let st = status(cmd)?;
    if !st.success() {
        eprintln!("xtask: {what} failed ({st})");
        failed.push(what);
    }
    Ok(())
}

/// `<tools>/bin/cargo-machete` at [`MACHETE_VERSION`], installed with `cargo install --locked`
/// when missing or another version.
fn ensure_machete(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    let bin = ctx.tools.join("bin").join("cargo-machete");
    if installed_version(&bin).as_deref() == Some(MACHETE_VERSION) {
        return Ok(bin);
    }
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ctx.workspace)
        .env("PATH", &ctx.path)
        // cargo install uses its own temporary target dir unless told otherwise.
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "install",
            "cargo-machete",
            "--locked",
            "--version",
            MACHETE_VERSION,
            "--root",
        ])
        .arg(&ctx.tools);
    println!("xtask: {}", describe(&cmd));
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    match installed_version(&bin) {
        Some(v) if v == MACHETE_VERSION => Ok(bin),
        other => bail!(
            "{} reports version {other:?} after installing {MACHETE_VERSION}",
            bin.display()
        ),
    }
}

/// `cargo-machete 0.9.2` → `0.9.2`.
fn installed_version(bin: &Path) -> Option<String> {
    if !bin.is_file() {
        return None;
    }
    let text = output(Command::new(bin).arg("--version")).ok()?;
    text.split_whitespace().last().map(str::to_owned)
}
