//! Prerequisites for building `reaper-ebpf` (see /work/shared/TOOLCHAIN.md for the recipe):
//!
//! 1. rustup with a `nightly` toolchain (aya-build runs `rustup run nightly cargo build
//!    -Z build-std=core --target bpfel-unknown-none`);
//! 2. nightly's `rust-src` component (for `-Z build-std`);
//! 3. `bpf-linker` in `<tools>/bin`, built against the nightly toolchain's own libLLVM, so its
//!    LLVM major matches the bitcode nightly emits. `<tools>/llvm/lib` holds symlinks to that
//!    libLLVM (`libLLVM.so` for linking, the soname for the binary's rpath); a stamp file records
//!    what it was built against, and it is rebuilt when nightly changes.
//!
//! Everything is checked every time and is cheap when already in place.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::Ctx;
use crate::cmd::{describe, output, status, status_tee_stderr};

/// The bpf-linker release we build (its `--version` prints `bpf-linker <this>`).
const BPF_LINKER_VERSION: &str = "0.13.0";
pub(crate) const NIGHTLY: &str = "nightly";

/// A rustup (or rustup-proxied) command that never downloads a toolchain on its own.
fn rustup_cmd(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("RUSTUP_AUTO_INSTALL", "0");
    cmd
}

/// Runs every check, installing what is missing.
pub(crate) fn setup(ctx: &Ctx) -> anyhow::Result<()> {
    let start = Instant::now();
    check_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker(ctx)?;
    println!("xtask: setup done in {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Step 1: rustup exists and has a `nightly` toolchain (not installed here: that needs the
/// network, which only package registries are reachable on).
fn check_nightly() -> anyhow::Result<()> {
    let mut cmd = rustup_cmd("rustup");
    cmd.args(["toolchain", "list"]);
    let list = match cmd.stdin(std::process::Stdio::null()).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "rustup is not on PATH: install it (https://rustup.rs) and then run \
             `rustup toolchain install nightly --component rust-src`"
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot run `{}`", describe(&cmd))),
        Ok(out) if !out.status.success() => bail!(
            "`{}` failed ({}): {}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    if !lists_plain_nightly(&list) {
        bail!(
            "the Rust nightly toolchain is not installed (the eBPF crate is built with nightly's \
             -Z build-std): run `rustup toolchain install nightly --component rust-src`"
        );
    }
    println!("xtask: nightly toolchain: present");
    Ok(())
}

/// Whether `rustup toolchain list` output has a plain `nightly`. Lines look like
/// `nightly-x86_64-unknown-linux-gnu (active)`; dated nightlies (`nightly-2026-05-19-…`) do not
/// count: aya-build asks rustup for plain `nightly`.
fn lists_plain_nightly(list: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| {
            name == NIGHTLY
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        })
}

/// Step 2: nightly's `rust-src`.
fn ensure_rust_src() -> anyhow::Result<()> {
    ensure_nightly_component("rust-src")
}

/// A nightly component (`rust-src`, `clippy`), installed with rustup if it is missing.
pub(crate) fn ensure_nightly_component(name: &str) -> anyhow::Result<()> {
    let installed = output(rustup_cmd("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    // Listed as `rust-src` (target-independent) or `clippy-x86_64-unknown-linux-gnu`.
    if installed.lines().any(|l| {
        let l = l.trim();
        l == name || l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}-"))
    }) {
        println!("xtask: {name} for nightly: present");
        return Ok(());
    }
    println!("xtask: {name} for nightly: installing…");
    let mut cmd = rustup_cmd("rustup");
    cmd.args(["component", "add", name, "--toolchain", NIGHTLY]);
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    println!("xtask: {name} for nightly: installed");
    Ok(())
}

/// What nightly's LLVM looks like; it determines how bpf-linker must be built.
struct NightlyLlvm {
    /// First line of `rustc -vV`, e.g. `rustc 1.97.0-nightly (e50aa6fba 2026-05-19)`.
    rustc: String,
    /// e.g. `22.1.4`.
    llvm_version: String,
    /// e.g. `22`.
    llvm_major: String,
    /// The real library, e.g. `<sysroot>/lib/libLLVM.so.22.1-rust-1.97.0-nightly`.
    lib: PathBuf,
    /// Its file name (the soname), e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
    soname: String,
}

impl NightlyLlvm {
    fn probe() -> anyhow::Result<Self> {
        let vv =
            output(rustup_cmd("rustup").args(["run", NIGHTLY, "rustc", "--version", "--verbose"]))?;
        let rustc = vv.lines().next().unwrap_or_default().trim().to_owned();
        let llvm_version = vv
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version:"))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("no `LLVM version:` line in nightly's `rustc -vV`:\n{vv}"))?;
        let llvm_major = llvm_version
            .split('.')
            .next()
            .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
            .with_context(|| format!("cannot read the LLVM major version from `{llvm_version}`"))?
            .to_owned();

        let sysroot =
            output(rustup_cmd("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?;
        let lib_dir = Path::new(sysroot.trim()).join("lib");
        let mut sonames: Vec<String> = fs::read_dir(&lib_dir)
            .with_context(|| format!("cannot list {}", lib_dir.display()))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with("libLLVM.so."))
            .collect();
        sonames.sort();
        let soname = match sonames.as_slice() {
            [one] => one.clone(),
            [] => bail!(
                "nightly ships no libLLVM.so.* in {} (needed to build bpf-linker against nightly's \
                 LLVM {llvm_major})",
                lib_dir.display()
            ),
            several => bail!(
                "nightly ships several libLLVM.so.* in {} ({}); cannot tell which one rustc uses",
                lib_dir.display(),
                several.join(", ")
            ),
        };
        Ok(Self {
            rustc,
            llvm_version,
            llvm_major,
            lib: lib_dir.join(&soname),
            soname,
        })
    }

    /// Stamp contents for a bpf-linker built against this LLVM.
    fn stamp(&self) -> String {
        format!(
            "nightly: {}\nllvm: {}\nlibLLVM: {}\nbpf-linker: {BPF_LINKER_VERSION} (--features llvm-{})\n",
            self.rustc, self.llvm_version, self.soname, self.llvm_major
        )
    }
}

/// Step 3: `<tools>/bin/bpf-linker`, built against nightly's libLLVM.
fn ensure_bpf_linker(ctx: &Ctx) -> anyhow::Result<()> {
    let llvm = NightlyLlvm::probe()?;
    let bin = ctx.tools.join("bin").join("bpf-linker");
    let llvm_lib = ctx.tools.join("llvm").join("lib");
    let stamp_path = ctx.tools.join("bpf-linker.stamp");
    let want = llvm.stamp();

    let runs = linker_version(&bin).as_deref() == Some(BPF_LINKER_VERSION);
    let links = links_ok(&llvm_lib, &llvm);
    let stamp = fs::read_to_string(&stamp_path).ok();
    let reason = match (runs, links, stamp) {
        (true, true, Some(s)) if s == want => {
            println!(
                "xtask: bpf-linker {BPF_LINKER_VERSION} (LLVM {}): present",
                llvm.llvm_major
            );
            return Ok(());
        }
        (true, true, None) => {
            // Built by hand with the same recipe (or by an xtask that predates the stamp):
            // it runs and is linked against today's nightly libLLVM, so adopt it.
            write_stamp(&stamp_path, &want)?;
            println!(
                "xtask: bpf-linker {BPF_LINKER_VERSION} (LLVM {}): present (recorded {})",
                llvm.llvm_major,
                stamp_path.display()
            );
            return Ok(());
        }
        (true, true, Some(_)) => "nightly changed since it was built".to_owned(),
        (false, _, _) if !bin.exists() => "not installed".to_owned(),
        (false, _, _) => format!(
            "{} does not run or is not {BPF_LINKER_VERSION}",
            bin.display()
        ),
        (true, false, _) => format!("its libLLVM symlinks in {} are stale", llvm_lib.display()),
    };
    println!(
        "xtask: bpf-linker: {reason}; building {BPF_LINKER_VERSION} against nightly's LLVM {} \
         into {} (about a minute)…",
        llvm.llvm_version,
        ctx.tools.display()
    );
    let start = Instant::now();
    build_bpf_linker(ctx, &llvm, &llvm_lib, &stamp_path)?;
    let got = linker_version(&bin);
    if got.as_deref() != Some(BPF_LINKER_VERSION) {
        bail!(
            "built {} but `bpf-linker --version` gives {got:?}, expected {BPF_LINKER_VERSION}",
            bin.display()
        );
    }
    write_stamp(&stamp_path, &want)?;
    println!(
        "xtask: bpf-linker {BPF_LINKER_VERSION} (LLVM {}): installed in {:.0}s",
        llvm.llvm_major,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The version `bin --version` reports (`bpf-linker 0.13.0` → `0.13.0`), if it runs at all.
fn linker_version(bin: &Path) -> Option<String> {
    if !bin.is_file() {
        return None;
    }
    let out = Command::new(bin)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().strip_prefix("bpf-linker")?.trim().to_owned())
}

/// Both symlinks in `llvm_lib` resolve to nightly's libLLVM.
fn links_ok(llvm_lib: &Path, llvm: &NightlyLlvm) -> bool {
    let Ok(target) = fs::canonicalize(&llvm.lib) else {
        return false;
    };
    ["libLLVM.so", llvm.soname.as_str()]
        .iter()
        .all(|name| fs::canonicalize(llvm_lib.join(name)).is_ok_and(|p| p == target))
}

fn write_stamp(path: &Path, contents: &str) -> anyhow::Result<()> {
    fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// TOOLCHAIN.md's recipe: symlink nightly's libLLVM into `<tools>/llvm/lib`, then
/// `LLVM_PREFIX=<tools>/llvm cargo install bpf-linker … --features llvm-NN --root <tools>`.
fn build_bpf_linker(
    ctx: &Ctx,
    llvm: &NightlyLlvm,
    llvm_lib: &Path,
    stamp: &Path,
) -> anyhow::Result<()> {
    // A failed build must not leave a stamp that looks current.
    match fs::remove_file(stamp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", stamp.display()));
        }
        _ => {}
    }
    fs::create_dir_all(llvm_lib)
        .with_context(|| format!("cannot create {}", llvm_lib.display()))?;
    // Drop symlinks left by an older nightly, then link `libLLVM.so` (for `-lLLVM` at link time)
    // and the soname (for the binary's rpath, `<tools>/llvm/lib`, at run time).
    for entry in
        fs::read_dir(llvm_lib).with_context(|| format!("cannot list {}", llvm_lib.display()))?
    {
        let entry = entry.with_context(|| format!("cannot list {}", llvm_lib.display()))?;
        let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
        if is_link && entry.file_name().to_string_lossy().starts_with("libLLVM") {
            fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    for name in ["libLLVM.so", llvm.soname.as_str()] {
        let link = llvm_lib.join(name);
        std::os::unix::fs::symlink(&llvm.lib, &link).with_context(|| {
            format!(
                "cannot symlink {} -> {}",
                link.display(),
                llvm.lib.display()
            )
        })?;
    }

    let feature = format!("llvm-{}", llvm.llvm_major);
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&ctx.workspace)
            .env("PATH", &ctx.path)
            .env("LLVM_PREFIX", ctx.tools.join("llvm"))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &feature])
            .arg("--root")
            .arg(&ctx.tools)
            // Rebuild even if cargo's own records say this version is installed.
            .arg("--force");
        // cargo install uses its own temporary target dir unless told otherwise.
        cmd.env_remove("CARGO_TARGET_DIR");
        if locked {
            cmd.arg("--locked");
        }
        println!("xtask: {}", describe(&cmd));
        let (st, stderr) = status_tee_stderr(&mut cmd)?;
        anyhow::Ok((st, stderr, describe(&cmd)))
    };
    let (st, stderr, line) = install(true)?;
    if st.success() {
        return Ok(());
    }
    let lockfile_problem = stderr.contains("--locked")
        || stderr.contains("lock file")
        || stderr.contains("Cargo.lock");
    if !lockfile_problem {
        bail!("`{line}` failed ({st})");
    }
    println!(
        "xtask: bpf-linker's published Cargo.lock cannot be used as is; retrying without --locked"
    );
    let (st, _, line) = install(false)?;
    if !st.success() {
        bail!("`{line}` failed ({st})");
    }
    Ok(())
}

/// Loading eBPF programs needs root; fail early with one sentence otherwise.
pub(crate) fn require_root(verb: &str) -> anyhow::Result<()> {
    if effective_uid()? != 0 {
        bail!(
            "`cargo xtask {verb}` needs root: eBPF programs are loaded into the kernel; run as \
             root, e.g. sudo -E cargo xtask {verb}"
        );
    }
    Ok(())
}

/// The effective uid, from /proc/self/status (`Uid: real effective saved fs`), else `id -u`.
fn effective_uid() -> anyhow::Result<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status")
        && let Some(euid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok())
    {
        return Ok(euid);
    }
    let out = output(Command::new("id").arg("-u"))?;
    out.trim()
        .parse()
        .with_context(|| format!("`id -u` printed {out:?}"))
}

#[cfg(test)]
mod tests {
    use super::lists_plain_nightly;

    #[test]
    fn finds_plain_nightly_only() {
        assert!(lists_plain_nightly(
            "stable-x86_64-unknown-linux-gnu (active, default)\nnightly-x86_64-unknown-linux-gnu\n"
        ));
        assert!(lists_plain_nightly(
            "nightly-aarch64-unknown-linux-gnu (default)\n"
        ));
        assert!(!lists_plain_nightly(
            "stable-x86_64-unknown-linux-gnu\nnightly-2026-05-19-x86_64-unknown-linux-gnu\n"
        ));
        assert!(!lists_plain_nightly("no installed toolchains\n"));
    }
}
