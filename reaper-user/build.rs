//! Compiles `reaper-ebpf` for the BPF target (nightly + `-Z build-std=core`, linked by
//! `bpf-linker`) so the daemon can embed it with `include_bytes_aligned!`.
//! `cargo xtask` installs both prerequisites; see xtask/src/setup.rs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    build_info();
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "reaper-ebpf")
        .ok_or_else(|| anyhow!("reaper-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not on PATH: build through `cargo xtask build` (it installs bpf-linker \
             into .tools/ and puts it on PATH), or add .tools/bin to PATH"
        ));
    }
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}

/// `REAPER_GIT_REVISION` and `REAPER_RUSTC_VERSION` for `reaper --version` and
/// `reaper_build_info`. The revision comes from `git` (or the variable of that name when set,
/// e.g. when building from a tarball), else "unknown".
fn build_info() {
    println!("cargo:rerun-if-env-changed=REAPER_GIT_REVISION");
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
    };
    let revision = std::env::var("REAPER_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // A new commit or checkout changes HEAD or the branch it points at (worktrees included:
    // --git-path resolves both).
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        // Only files that exist: cargo reruns a script on every build for a missing one.
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    // `rustc 1.95.0 (59807616e 2026-04-14)` → `1.95.0`.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=REAPER_GIT_REVISION={revision}");
    println!("cargo:rustc-env=REAPER_RUSTC_VERSION={rustc_version}");
}
